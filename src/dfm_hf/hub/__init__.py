"""Sharing on the Hugging Face Hub: the download helpers, model cards and pushes.

Three modules, lowest first: :mod:`~dfm_hf.hub.download` (a leaf: it imports nothing from ``dfm_hf``, so the model
and conversion layers may import it), :mod:`~dfm_hf.hub.cards` and :mod:`~dfm_hf.hub.push` (these import the scheduler
presets and nothing of pipelines, training, evaluation or bundles). Names resolve lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule of ``dfm_hf.hub`` defining it
_EXPORTS = {
    "ADAPTER_CONFIG": "download",
    "ADAPTER_WEIGHTS": "download",
    "PICKLE_ALLOW_PATTERNS": "download",
    "PICKLE_SUFFIXES": "download",
    "PIPELINE_ALLOW_PATTERNS": "download",
    "download_pipeline": "download",
    "download_snapshot": "download",
    "is_repo_id": "download",
    "local_adapter_files": "download",
    "preset_rows": "cards",
    "render_lora_card": "cards",
    "render_pipeline_card": "cards",
    "write_training_card": "cards",
    "list_scheduler_presets": "push",
    "push_pipeline_folder": "push",
    "push_pipeline_to_hub": "push",
    "push_scheduler_preset": "push",
    "push_lora_adapter": "push",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dfm_hf.hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
