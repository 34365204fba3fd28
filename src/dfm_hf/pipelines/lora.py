"""LoRA adapters on a loaded model through peft's own API (``inject_adapter_in_model``,
``set_peft_model_state_dict``), in place: the model stays a ``DFMForMaskedGeneration``.

transformers 5.24 refuses its own adapter methods with peft < 0.22 (0.21.2 is the newest available), so these
helpers call peft directly. Adapter weights are read from safetensors only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapters injected into ``model``."""
    return list(getattr(model, "peft_config", {}) or {})


def local_adapter_files(folder: str, argument: str, hint: str) -> tuple[str, str]:
    """``(adapter_config.json, adapter_model.safetensors)`` paths of a local adapter folder; ``ValueError`` naming
    ``argument`` (with ``hint``) when either file is missing."""
    config, weights = os.path.join(folder, ADAPTER_CONFIG), os.path.join(folder, ADAPTER_WEIGHTS)
    for f in (config, weights):
        if not os.path.isfile(f):
            raise ValueError(f"`{argument}` {folder!r} has no {os.path.basename(f)} ({hint}).")
    return config, weights


def _resolve_adapter_files(path_or_repo: str, **kwargs: Any) -> tuple[str, str]:
    if os.path.isdir(path_or_repo):
        return local_adapter_files(
            path_or_repo,
            "pretrained_model_name_or_path",
            "a PEFT LoRA adapter folder holds adapter_config.json and adapter_model.safetensors",
        )
    if path_or_repo.startswith(("/", ".", "~")) or path_or_repo.count("/") > 1 or not path_or_repo.strip():
        raise ValueError(f"`pretrained_model_name_or_path` {path_or_repo!r} is neither a folder nor a Hub repo id.")
    from ..hub import download_snapshot

    # one snapshot: both files come from the same commit even if the branch moves meanwhile
    keys = ("revision", "cache_dir", "token", "local_files_only", "force_download")
    hub = {k: kwargs[k] for k in keys if k in kwargs}
    folder = download_snapshot(path_or_repo, [ADAPTER_CONFIG, ADAPTER_WEIGHTS], what="LoRA adapter", **hub)
    config, weights = os.path.join(folder, ADAPTER_CONFIG), os.path.join(folder, ADAPTER_WEIGHTS)
    for f in (config, weights):
        if not os.path.isfile(f):
            at = f" at revision {kwargs['revision']!r}" if kwargs.get("revision") else ""
            raise OSError(
                f"LoRA adapter repo {path_or_repo!r}{at} has no {os.path.basename(f)} (a PEFT LoRA adapter repo holds "
                "adapter_config.json and adapter_model.safetensors; pickled adapter_model.bin files are not loaded)."
            )
    return config, weights


def load_lora_weights(
    model: torch.nn.Module, path_or_repo: str, adapter_name: Optional[str] = None, **kwargs: Any
) -> str:
    """Inject a saved PEFT LoRA adapter into ``model`` and activate it; returns the adapter name."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config_file, weights_file = _resolve_adapter_files(path_or_repo, **kwargs)
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"`pretrained_model_name_or_path` holds a {raw.get('peft_type')} adapter; only LORA loads.")
    config = LoraConfig.from_pretrained(os.path.dirname(config_file))
    config.inference_mode = True
    name = adapter_name or f"adapter_{len(adapter_names(model))}"
    if name in adapter_names(model):
        raise ValueError(f"`adapter_name` {name!r} is already loaded; pick another or unload first.")
    inject_adapter_in_model(config, model, adapter_name=name)
    state = load_file(weights_file, device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in result.unexpected_keys]
    if missing:
        raise ValueError(f"adapter weights do not fit this model (unexpected keys, e.g. {missing[:3]}).")
    dtype = next(model.parameters()).dtype
    for _, layer in _tuner_layers(model):
        layer.to(dtype)
    set_adapters(model, adapter_names(model))
    return name


def set_adapters(
    model: torch.nn.Module,
    names: Union[str, list[str]],
    weights: Optional[Union[float, list[float]]] = None,
) -> None:
    """Activate ``names`` (all others off) and set each adapter's weight (a multiplier of ``lora_alpha / r``)."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"`adapter_names` {unknown} are not loaded; loaded: {known}.")
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"`adapter_weights` needs one weight per adapter ({len(names)}), got {len(weights)}.")
    for _, layer in _tuner_layers(model):
        layer.set_adapter(names)
        for n, w in zip(names, weights):
            if hasattr(layer, "set_scale") and n in getattr(layer, "scaling", {}):
                layer.set_scale(n, w)


def fuse_lora(model: torch.nn.Module, names: Optional[list[str]] = None) -> None:
    """Merge the active (or named) adapters into the base weights."""
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError("no LoRA adapter is loaded: call `load_lora_weights` first.")
    for _, layer in layers:
        layer.merge(adapter_names=names)


def unfuse_lora(model: torch.nn.Module) -> None:
    """Subtract merged adapters from the base weights again."""
    for _, layer in _tuner_layers(model):
        if layer.merged:
            layer.unmerge()


def unload_lora_weights(model: torch.nn.Module) -> None:
    """Replace every LoRA layer by its base layer (unmerging first), and forget the adapter configs."""
    for name, layer in _tuner_layers(model):
        if layer.merged:
            layer.unmerge()
        _replace(model, name, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    for attr in ("_hf_peft_config_loaded",):
        if hasattr(model, attr):
            setattr(model, attr, False)


def _replace(root: torch.nn.Module, dotted: str, new: torch.nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@contextlib.contextmanager
def clean_model_for_saving(pipe: Any) -> Iterator[None]:
    """Within the block, ``pipe.model`` is a copy without LoRA layers whose weights hold fused adapters.

    Unfused adapters raise ``ValueError``: saving them silently would drop them from the saved model.
    """
    model = getattr(pipe, "model", None)
    layers = _tuner_layers(model) if model is not None else []
    if not layers:
        yield
        return
    if not all(layer.merged for _, layer in layers):
        raise ValueError(
            "the pipeline's model has unfused LoRA adapters: call `pipe.fuse_lora()` to save them merged, or "
            "`pipe.unload_lora_weights()` to save the base model (adapters are saved by peft's own save_pretrained)."
        )
    clean = copy.deepcopy(model)
    for name, layer in _tuner_layers(clean):
        _replace(clean, name, layer.get_base_layer())
    if hasattr(clean, "peft_config"):
        del clean.peft_config
    pipe.register_modules(model=clean)
    try:
        yield
    finally:
        pipe.register_modules(model=model)
