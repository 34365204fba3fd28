"""Named scheduler presets: scheduler configs that travel with a pipeline under
``scheduler_presets/<name>/scheduler_config.json``.

The shipped presets (:data:`PRESET_SPECS`), the classes a preset may name (:data:`PRESET_CLASSES`), and reading and
writing preset folders. Only the classes of :data:`PRESET_CLASSES` are ever instantiated from a config file.
"""

from __future__ import annotations

import json
import os
from typing import Any

from diffusers import BlockRefinementScheduler, DiscreteDDIMScheduler, EntropyBoundScheduler

from .scheduling_confidence import ConfidenceUnmaskingScheduler
from .scheduling_discrete_flow import DiscreteFlowScheduler

#: Folder of a pipeline (local or Hub repo) that holds one ``<name>/scheduler_config.json`` per preset.
PRESETS_DIR = "scheduler_presets"
#: class name -> class: the only scheduler classes a preset config may name (ours, and diffusers' discrete
#: schedulers, which DFMPipeline runs through ``dfm_hf.pipelines.foreign_schedulers``).
PRESET_CLASSES: dict[str, type] = {
    c.__name__: c
    for c in (
        DiscreteFlowScheduler,
        ConfidenceUnmaskingScheduler,
        BlockRefinementScheduler,
        EntropyBoundScheduler,
        DiscreteDDIMScheduler,
    )
}

#: name -> (class, config overrides, what it is good for)
PRESET_SPECS: dict[str, tuple[type, dict[str, Any], str]] = {
    "linear-euler": (
        DiscreteFlowScheduler,
        dict(kappa_schedule="polynomial", kappa_exponent=1.0, corrector_alpha=0.0),
        "DFM Euler, linear kappa: exact in the limit, tokens revealed at an even rate; the reference sampler.",
    ),
    "cubic-euler": (
        DiscreteFlowScheduler,
        dict(kappa_schedule="polynomial", kappa_exponent=3.0, corrector_alpha=0.0),
        "DFM Euler, cubic kappa: few tokens early, most late; fewer model calls at large step counts.",
    ),
    "cubic-corrector": (
        DiscreteFlowScheduler,
        dict(kappa_schedule="polynomial", kappa_exponent=3.0, corrector_alpha=10.0, corrector_a=2.0, corrector_b=0.25),
        "DFM corrector sampling (re-masks and re-draws tokens; same marginals): better samples at high step counts.",
    ),
    "confidence": (
        ConfidenceUnmaskingScheduler,
        dict(remasking="low_confidence", temperature=0.0),
        "MaskGIT/LLaDA low-confidence unmasking, greedy: the baseline the paper compares against.",
    ),
    "confidence-blocks": (
        ConfidenceUnmaskingScheduler,
        dict(remasking="low_confidence", temperature=0.0, block_length=32),
        "LLaDA's semi-autoregressive greedy unmasking in blocks of 32: reads logits in the open block only (fast).",
    ),
    "fast-dllm-threshold": (
        ConfidenceUnmaskingScheduler,
        dict(
            remasking="low_confidence",
            temperature=0.0,
            block_length=32,
            confidence_threshold=0.9,
            threshold_rule="top1",
        ),
        "Fast-dLLM's threshold decoding, greedy, blocks of 32: each step the most confident position and every one "
        "above 0.9, as many steps as a block needs; pair with kv_cache='dual'.",
    ),
}


def default_scheduler_presets(scheduler: Any) -> dict[str, Any]:
    """The shipped presets, with the mask id and vocabulary of ``scheduler`` (empty for a uniform source)."""
    cfg = getattr(scheduler, "config", None)
    if cfg is None or cfg.get("mask_token_id") is None or cfg.get("source_distribution", "mask") != "mask":
        return {}
    base = {"mask_token_id": cfg["mask_token_id"], "vocab_size": cfg.get("vocab_size")}
    return {name: cls(**base, **overrides) for name, (cls, overrides, _) in PRESET_SPECS.items()}


def check_preset_name(name: Any) -> str:
    """``name`` if it is a plain folder name (no separator, not hidden); ``ValueError`` otherwise."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"preset `name` must be a plain folder name, got {name!r}.")
    return name


def preset_names_in_folder(folder: str) -> list[str]:
    """Names of the presets stored in a local pipeline folder (sorted; empty if none)."""
    root = os.path.join(folder, PRESETS_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "scheduler_config.json")))


def load_presets_from_folder(folder: str) -> dict[str, Any]:
    """Read every ``scheduler_presets/<name>/scheduler_config.json`` of a pipeline folder.

    Only the classes of :data:`PRESET_CLASSES` are instantiated; any other ``_class_name`` is refused (a config
    never names code to run).
    """
    return {
        name: scheduler_from_config_file(os.path.join(folder, PRESETS_DIR, name, "scheduler_config.json"))
        for name in preset_names_in_folder(folder)
    }


def scheduler_from_config_file(path: str) -> Any:
    """Instantiate the scheduler of :data:`PRESET_CLASSES` a ``scheduler_config.json`` names (``ValueError`` for
    anything else)."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    cls = PRESET_CLASSES.get(config.get("_class_name"))
    if cls is None:
        raise ValueError(
            f"{path}: `_class_name` must be one of {sorted(PRESET_CLASSES)}, got {config.get('_class_name')!r}."
        )
    return cls.from_config(config)


def save_presets(presets: dict[str, Any], folder: str) -> None:
    """Write each preset's ``scheduler_config.json`` under ``folder/scheduler_presets/<name>/``."""
    for name, scheduler in presets.items():
        scheduler.save_pretrained(os.path.join(folder, PRESETS_DIR, check_preset_name(name)))
