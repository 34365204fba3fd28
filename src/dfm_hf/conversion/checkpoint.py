"""The files of a foreign checkpoint: the folder (local or a Hub snapshot), its ``config.json`` and its safetensors
weights (one file, or shards named by ``model.safetensors.index.json``), read through ``safetensors`` itself.

Only safetensors are read (pickles can run code on load and are refused), and never unpickled. The index lists every
tensor's name, dtype and shape from the file headers alone; :func:`iter_tensors` then reads one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..hub.download import PICKLE_SUFFIXES, download_snapshot, is_repo_id
from .families import _format_names

#: Files a model download fetches: configs and safetensors weights. Never code, never pickles.
MODEL_ALLOW_PATTERNS = ["*.json", "*.safetensors"]
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: Keyword arguments of a load that :func:`resolve_folder` consumes (where to find the files).
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")

# how `safetensors` reads tensor bytes: `pread` into fresh memory (its default, "mmap", leaves tensors backed by a map
# of the file, which the model would then hold: overwriting the file in place would change or break its weights)
_BACKEND = "pread"
# safetensors dtype names -> torch dtypes (the ones a model checkpoint may hold)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint as its file header describes it: the file holding it, its dtype and shape."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class CheckpointIndex:
    """Every tensor of a safetensors checkpoint (one file, or shards named by ``model.safetensors.index.json``)."""

    folder: str
    files: list[str]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)

    def floating_dtype(self) -> Optional[torch.dtype]:
        """The floating dtype holding most of the checkpoint's elements (None if it has no floating tensors)."""
        counts: Counter[torch.dtype] = Counter()
        for entry in self.tensors.values():
            if entry.dtype.is_floating_point:
                counts[entry.dtype] += math.prod(entry.shape)
        return counts.most_common(1)[0][0] if counts else None

    def path(self, file: str) -> str:
        """The full path of ``file`` (one of :attr:`files`)."""
        return os.path.join(self.folder, file)


def broken_file_error(path: str, folder: str, err: BaseException) -> OSError:
    """The ``OSError`` for a weights file ``safetensors`` cannot read, naming the file and its folder."""
    return OSError(
        f"{os.path.basename(path)} in {folder} is not a valid safetensors file ({err}); it may be truncated or "
        "corrupted (an interrupted download or save): download or save it again."
    )


def _weight_files(folder: str) -> tuple[list[str], Optional[dict[str, str]]]:
    """``(files, weight_map)``: the safetensors files of ``folder`` and its shard index (None for one file)."""
    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("`weight_map` must be a non-empty object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise OSError(f"{SAFE_WEIGHTS_INDEX_NAME} in {folder} is not a valid shard index ({err}).") from err
        files = sorted(set(weight_map.values()))
        for name in files:
            if not isinstance(name, str) or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
                raise OSError(f"{SAFE_WEIGHTS_INDEX_NAME} in {folder} names an invalid shard file {name!r}.")
            if not name.endswith(".safetensors"):
                raise ValueError(f"{SAFE_WEIGHTS_INDEX_NAME} in {folder} names {name!r}: only safetensors are read.")
        return files, weight_map
    if os.path.isfile(os.path.join(folder, SAFE_WEIGHTS_NAME)):
        return [SAFE_WEIGHTS_NAME], None
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    pickles = [f for f in present if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"{folder} holds pickled weights ({', '.join(pickles)}) and no safetensors; pickles can run code on "
            "load and are refused. Convert them to safetensors with a tool you trust."
        )
    raise OSError(f"{folder} has no {SAFE_WEIGHTS_NAME} and no {SAFE_WEIGHTS_INDEX_NAME}.")


def _file_tensors(path: str, folder: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> ``(safetensors dtype name, shape)`` from one file's header (``safetensors`` checks the whole
    file's layout on opening: a truncated or corrupted file raises ``OSError`` naming it)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", backend=_BACKEND) as f:
            return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except Exception as err:  # SafetensorError (incomplete or invalid header, file not fully covered), OSError
        raise broken_file_error(path, folder, err) from err


def read_checkpoint_index(folder: str) -> CheckpointIndex:
    """Index the safetensors weights of ``folder`` (``model.safetensors.index.json`` shards, or one file).

    Reads the file headers only (no tensor data). Raises ``ValueError`` when the folder only holds pickled weights
    (refused: they can run code on load) and ``OSError`` naming the file when weights are missing, broken or disagree
    with the index.
    """
    files, weight_map = _weight_files(folder)
    index = CheckpointIndex(folder=folder, files=files)
    for name in files:
        path = index.path(name)
        if not os.path.isfile(path):
            raise OSError(f"{name} (named by {SAFE_WEIGHTS_INDEX_NAME}) is missing from {folder}.")
        for tensor, (dtype, shape) in _file_tensors(path, folder).items():
            if dtype not in _SAFETENSORS_DTYPES:
                raise OSError(f"{name} in {folder}: tensor {tensor!r} has dtype {dtype}, which we do not read.")
            if tensor in index.tensors:
                raise OSError(f"{folder}: tensor {tensor!r} is stored twice ({index.tensors[tensor].file} and {name}).")
            index.tensors[tensor] = TensorEntry(name, _SAFETENSORS_DTYPES[dtype], shape)
    if weight_map is not None:
        wrong = sorted(t for t, f in weight_map.items() if t not in index.tensors or index.tensors[t].file != f)
        extra = sorted(t for t in index.tensors if t not in weight_map)
        if wrong or extra:
            parts = [f"not found where the index says: {_format_names(wrong)}"] if wrong else []
            parts += [f"not in the index: {_format_names(extra)}"] if extra else []
            raise OSError(f"{SAFE_WEIGHTS_INDEX_NAME} in {folder} disagrees with its shards: " + "; ".join(parts))
    return index


def iter_tensors(index: CheckpointIndex, names: Collection[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each of ``names``, file by file, each tensor read when its turn comes.

    Every tensor is read with ``pread`` into a fresh CPU tensor (``safetensors``' ``"pread"`` backend): no memory map
    of the file, so the loaded weights own their memory and hold nothing of the file. A file that cannot be read
    raises ``OSError`` naming it and its folder.
    """
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in sorted(names):
        by_file.setdefault(index.tensors[name].file, []).append(name)
    for file, file_names in sorted(by_file.items()):
        path = index.path(file)
        try:
            handle = safe_open(path, framework="pt", backend=_BACKEND)
        except Exception as err:  # SafetensorError (the file changed since it was indexed), OSError
            raise broken_file_error(path, index.folder, err) from err
        with handle as f:
            for name in file_names:
                try:
                    tensor = f.get_tensor(name)
                except Exception as err:  # SafetensorError (e.g. the file was cut short since), OSError
                    raise broken_file_error(path, index.folder, err) from err
                yield name, tensor


def read_config_dict(folder: str) -> dict[str, Any]:
    """The ``config.json`` of ``folder`` as a dict (``OSError`` naming the file when missing or not valid JSON)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError as err:
        raise OSError(f"{folder} has no config.json.") from err
    except (OSError, ValueError) as err:
        raise OSError(f"config.json in {folder} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise OSError(f"config.json in {folder} must hold a JSON object.")
    return config


def resolve_folder(
    name: Union[str, os.PathLike],
    allow_patterns: list[str],
    what: str = "model repo",
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    subfolder: str = "",
) -> str:
    """A local folder as is, or the snapshot of Hub repo ``name`` with the files matching ``allow_patterns`` (through
    :func:`dfm_hf.hub.download.download_snapshot`: revisions, offline cache, errors naming the repo and file)."""
    name = str(name)
    subfolder = subfolder or ""
    if os.path.isdir(name):
        folder = os.path.join(name, subfolder) if subfolder else name
        if not os.path.isdir(folder):
            raise OSError(f"{name} has no subfolder {subfolder!r}.")
        return folder
    if not is_repo_id(name):
        raise OSError(f"{name!r} is neither a folder nor a Hub repo id.")
    patterns = [f"{subfolder.strip('/')}/{p}" for p in allow_patterns] if subfolder else list(allow_patterns)
    snapshot = download_snapshot(
        name,
        patterns,
        what=what,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    folder = os.path.join(snapshot, subfolder) if subfolder else snapshot
    if not os.path.isdir(folder):
        raise OSError(f"Hub repo {name!r} has no subfolder {subfolder!r} with {', '.join(allow_patterns)} files.")
    return folder
