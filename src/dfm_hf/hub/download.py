"""Downloading from the Hugging Face Hub: pipeline snapshots and LoRA adapter files, with errors that name the repo,
the revision and the file.

The lowest layer of dfm_hf's Hub code: it imports nothing from dfm_hf, so both :mod:`dfm_hf.hub` (pushing, cards)
and :mod:`dfm_hf.pipelines.lora` (loading adapters) build on it without importing each other.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DOWNLOAD_ARGUMENTS",
    "HUB_OPTIONS",
    "PICKLE_ALLOW_PATTERNS",
    "PICKLE_SUFFIXES",
    "PIPELINE_ALLOW_PATTERNS",
    "download_pipeline",
    "download_snapshot",
    "is_repo_id",
    "local_adapter_files",
]

#: Files a pipeline download fetches: configs, safetensors weights, tokenizer files, presets, the card. Never code.
PIPELINE_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.md"]
#: Added to :data:`PIPELINE_ALLOW_PATTERNS` with ``allow_pickle=True``.
PICKLE_ALLOW_PATTERNS = ["*.bin"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: The two files of a PEFT LoRA adapter folder or repo (pickled ``adapter_model.bin`` files are never loaded).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The download arguments :func:`download_snapshot` names (and every loader of dfm_hf accepts).
DOWNLOAD_ARGUMENTS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
#: Download arguments of ``huggingface_hub`` passed on as they are (besides :data:`DOWNLOAD_ARGUMENTS`).
HUB_OPTIONS = ("local_dir", "etag_timeout", "headers", "endpoint", "user_agent")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` can be a Hub repo id (``name`` or ``namespace/name`` by ``huggingface_hub``'s rules) rather
    than a path: no leading ``/``, ``.`` or ``~``, at most one ``/``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name.strip() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def local_adapter_files(folder: str, argument: str, hint: str) -> tuple[str, str]:
    """``(adapter_config.json, adapter_model.safetensors)`` paths of a local adapter folder; ``ValueError`` naming
    ``argument`` (with ``hint``) when either file is missing."""
    config, weights = os.path.join(folder, ADAPTER_CONFIG), os.path.join(folder, ADAPTER_WEIGHTS)
    for f in (config, weights):
        if not os.path.isfile(f):
            raise ValueError(f"`{argument}` {folder!r} has no {os.path.basename(f)} ({hint}).")
    return config, weights


def _cache_root(cache_dir: Optional[str]) -> str:
    from huggingface_hub import constants

    return str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE


def _cached_commit(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[str]:
    from huggingface_hub.file_download import repo_folder_name

    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = os.path.join(_cache_root(cache_dir), repo_folder_name(repo_id=repo_id, repo_type="model"), "refs", revision)
    try:
        with open(ref, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _cached_repo_files(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[list[str]]:
    """The repo's file list at ``revision`` as cached by the last ``snapshot_download`` (no request), or None."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    commit = _cached_commit(repo_id, revision, cache_dir)
    if commit is None:
        return None
    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None


def _where(what: str, repo_id: str, revision: Optional[str]) -> str:
    from huggingface_hub import constants

    at = f" at revision {revision!r}" if revision else ""
    return f"{what} {repo_id!r}{at} (Hub {constants.ENDPOINT})"


def _redownload_missing(
    repo_id: str, allow_patterns: list[str], revision: Optional[str], cache_dir: Optional[str], **hub: Any
) -> Optional[str]:
    """After a failed ``snapshot_download``: fetch the files still missing one by one, so that a persistent failure
    is reported with the file it concerns (and a transient one is retried once). Returns the snapshot folder, or
    None when the repo's file list is not cached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import filter_repo_objects

    commit = _cached_commit(repo_id, revision, cache_dir)
    files = _cached_repo_files(repo_id, revision, cache_dir)
    if commit is None or files is None:
        return None
    snapshot = os.path.join(_cache_root(cache_dir), repo_folder_name(repo_id=repo_id, repo_type="model"))
    snapshot = os.path.join(snapshot, "snapshots", commit)
    for path in filter_repo_objects(files, allow_patterns=allow_patterns):
        if os.path.isfile(os.path.join(snapshot, *path.split("/"))):
            continue
        try:
            hf_hub_download(repo_id, path, revision=commit, cache_dir=cache_dir, **hub)
        except ValueError:
            raise
        except Exception as err:
            raise _FileDownloadError(path, err) from err
    return snapshot


class _FileDownloadError(Exception):
    def __init__(self, path: str, error: Exception) -> None:
        super().__init__(path)
        self.path, self.error = path, error


def download_snapshot(
    repo_id: str,
    allow_patterns: list[str],
    *,
    what: str = "Hub repo",
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    **hub_options: Any,
) -> str:
    """``snapshot_download`` of the files of ``repo_id`` matching ``allow_patterns``; returns the snapshot folder.

    ``hub_options`` are the other download arguments of ``huggingface_hub`` (:data:`HUB_OPTIONS`: ``local_dir``,
    ``etag_timeout``, ``headers``, ``endpoint``, ``user_agent``), passed on; anything else raises ``TypeError``.

    Works offline from a complete cached snapshot (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``). Failures
    raise an ``OSError`` naming the repo, the revision and, for a download that failed, the file; no partial file is
    left in the cache (``huggingface_hub`` downloads to ``*.incomplete`` files that are only renamed when complete).
    Invalid repo ids raise ``huggingface_hub``'s ``HFValidationError`` (a ``ValueError``).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unknown = sorted(set(hub_options) - set(HUB_OPTIONS))
    if unknown:
        raise TypeError(
            f"download_snapshot() got unexpected keyword arguments {unknown}; accepted: {list(HUB_OPTIONS)}."
        )
    hub = dict(token=token, force_download=force_download, **{k: v for k, v in hub_options.items() if v is not None})
    where = _where(what, repo_id, revision)
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=allow_patterns,
            **hub,
        )
    except RevisionNotFoundError as err:
        raise OSError(f"Could not download {where}: the repo has no revision {revision!r}.\n{err}") from err
    except RepositoryNotFoundError as err:
        raise OSError(f"Could not download {where}: no such repo (or no access to it).\n{err}") from err
    except LocalEntryNotFoundError as err:
        raise OSError(
            f"Could not load {where} from the local cache {_cache_root(cache_dir)!r} (offline or "
            f"`local_files_only=True`, or the Hub could not be reached).\n{err}"
        ) from err
    except ValueError:
        raise  # invalid repo id or arguments: already clear
    except Exception as err:  # HfHubHTTPError, a size mismatch (OSError), a broken connection...
        retry = isinstance(err, (HfHubHTTPError, OSError)) and not _is_connection_error(err)
        if local_files_only or not retry or hub.get("local_dir") is not None:
            raise OSError(f"Could not download {where}.\n{err}") from err
        first = err
    try:
        folder = _redownload_missing(repo_id, allow_patterns, revision, cache_dir, **hub)
    except _FileDownloadError as failed:
        raise OSError(f"Could not download {failed.path!r} of {where}.\n{failed.error}") from failed.error
    if folder is None:
        raise OSError(f"Could not download {where}.\n{first}") from first
    return folder


def _is_connection_error(err: BaseException) -> bool:
    """True for httpx transport errors (connection refused or reset, timeouts, proxies): retrying is pointless."""
    return any(cls.__name__ in ("TransportError", "TimeoutException") for cls in type(err).__mro__)


def download_pipeline(
    repo_id: str,
    *,
    allow_pickle: bool = False,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    **hub_options: Any,
) -> str:
    """Download the safe files of a pipeline repo (:data:`PIPELINE_ALLOW_PATTERNS`; pickles only with
    ``allow_pickle=True``) and return the snapshot folder (``hub_options``: see :func:`download_snapshot`).

    A model component without safetensors weights raises: ``ValueError`` when the repo only has pickled weights
    (and ``allow_pickle`` is False), ``OSError`` when it has none. Other failures: see :func:`download_snapshot`.
    """
    patterns = PIPELINE_ALLOW_PATTERNS + (PICKLE_ALLOW_PATTERNS if allow_pickle else [])
    folder = download_snapshot(
        repo_id,
        patterns,
        what="DFM pipeline",
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
        **hub_options,
    )
    _check_component_weights(folder, repo_id, revision, cache_dir, allow_pickle)
    return folder


def _check_component_weights(
    folder: str, repo_id: str, revision: Optional[str], cache_dir: Optional[str], allow_pickle: bool
) -> None:
    """Raise if a model component of the downloaded pipeline (a folder with ``config.json``) has no weights."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return  # from_pretrained reports a missing or broken model_index.json
    if not isinstance(index, dict):
        return
    weights = (".safetensors",) + (PICKLE_SUFFIXES if allow_pickle else ())
    repo_files: Optional[list[str]] = None
    for component in sorted(k for k in index if not k.startswith("_")):
        sub = os.path.join(folder, component)
        if not os.path.isfile(os.path.join(sub, "config.json")):
            continue
        if any(f.endswith(weights) for f in os.listdir(sub)):
            continue
        if repo_files is None:
            repo_files = _cached_repo_files(repo_id, revision, cache_dir) or []
        pickles = [p for p in repo_files if p.startswith(f"{component}/") and p.endswith(PICKLE_SUFFIXES)]
        where = _where("DFM pipeline", repo_id, revision)
        if pickles and not allow_pickle:
            raise ValueError(
                f"{where}: {pickles[0]} is a pickle file and there are no safetensors weights for the {component!r} "
                "component; pickles can run code on load. Pass `allow_pickle=True` only for a source you trust."
            )
        raise OSError(f"{where} has no weights for its {component!r} component (expected {component}/*.safetensors).")
