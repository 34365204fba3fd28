"""LoRA adapters on a loaded model through peft's own API (``inject_adapter_in_model``,
``set_peft_model_state_dict``), in place: the model stays a ``DFMForMaskedGeneration``.

transformers 5.24 refuses its own adapter methods with peft < 0.22 (0.21.2 is the newest available), so these
helpers call peft directly. Adapter weights are read from safetensors only.

- Functions on a model: :func:`load_lora_weights`, :func:`set_adapters`, :func:`fuse_lora`, :func:`unfuse_lora`,
  :func:`unload_lora_weights`, :func:`delete_adapters`, :func:`disable_lora` / :func:`enable_lora`,
  :func:`get_active_adapters`.
- :class:`DFMLoraLoaderMixin`: the same as pipeline methods (diffusers' names and arguments) on ``self.model``.

A load either succeeds or leaves the model exactly as it was (modules, weights, ``requires_grad`` flags, the
adapter configs): adapter weights missing for an injected module or not fitting the model raise, naming the keys.
Nothing but peft's own state is kept on the model: the ``requires_grad`` flags the base parameters had before the
first adapter (peft freezes them on injection) are kept by the pipeline and handed back to :func:`unload_lora_weights`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import weakref
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file

from ..hub.download import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DOWNLOAD_ARGUMENTS,
    download_snapshot,
    is_repo_id,
    local_adapter_files,
)

__all__ = [
    "DFMLoraLoaderMixin",
    "adapter_names",
    "clean_model_for_saving",
    "delete_adapters",
    "disable_lora",
    "enable_lora",
    "fuse_lora",
    "get_active_adapters",
    "load_lora_weights",
    "requires_grad_flags",
    "set_adapters",
    "unfuse_lora",
    "unload_lora_weights",
]


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapters injected into ``model``."""
    return list(getattr(model, "peft_config", {}) or {})


def requires_grad_flags(model: torch.nn.Module) -> dict[str, bool]:
    """``{parameter name: requires_grad}`` of ``model`` (what :func:`unload_lora_weights` can restore)."""
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _resolve_adapter_files(path_or_repo: str, **kwargs: Any) -> tuple[str, str]:
    if os.path.isdir(path_or_repo):
        return local_adapter_files(
            path_or_repo,
            "pretrained_model_name_or_path",
            "a PEFT LoRA adapter folder holds adapter_config.json and adapter_model.safetensors",
        )
    if not is_repo_id(path_or_repo):
        raise ValueError(f"`pretrained_model_name_or_path` {path_or_repo!r} is neither a folder nor a Hub repo id.")
    # one snapshot: both files come from the same commit even if the branch moves meanwhile
    hub = {k: kwargs[k] for k in DOWNLOAD_ARGUMENTS if k in kwargs}
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


def _adapter_keys(keys: list[str], name: str) -> list[str]:
    """The entries of ``keys`` (state-dict keys) that belong to adapter ``name``: ``...lora_A.<name>.weight``."""
    out = []
    for key in keys:
        parts = key.split(".")
        if any(p.startswith("lora_") and i + 1 < len(parts) and parts[i + 1] == name for i, p in enumerate(parts)):
            out.append(key)
    return out


def _listing(keys: list[str], limit: int = 12) -> str:
    """``keys`` comma-separated, the first ``limit`` of them and how many more."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_lora_weights(
    model: torch.nn.Module, path_or_repo: str, adapter_name: Optional[str] = None, **kwargs: Any
) -> str:
    """Inject a saved PEFT LoRA adapter into ``model`` and activate it (with the adapters already active); returns
    the adapter name.

    Raises ``ValueError`` when the adapter does not fit the model (weights missing for an injected module, or keys
    the model has no place for; both named) or ``adapter_name`` is taken; on any failure the model is left exactly
    as it was.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config_file, weights_file = _resolve_adapter_files(path_or_repo, **kwargs)
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        peft_type = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"`pretrained_model_name_or_path` holds a {peft_type} adapter; only LORA loads.")
    config = LoraConfig.from_pretrained(os.path.dirname(config_file))
    config.inference_mode = True
    name = adapter_name or f"adapter_{len(adapter_names(model))}"
    if name in adapter_names(model):
        raise ValueError(f"`adapter_name` {name!r} is already loaded; pick another or unload first.")
    first = next(model.parameters())
    state = load_file(weights_file, device=str(first.device))  # a broken file fails here, before the model changes
    active = get_active_adapters(model)
    disabled = any(layer.disable_adapters for _, layer in _tuner_layers(model))  # disable_lora() holds for it too

    before = _Snapshot(model)
    try:
        inject_adapter_in_model(config, model, adapter_name=name)
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        unexpected = list(result.unexpected_keys)
        if unexpected:
            raise ValueError(
                f"adapter weights do not fit this model: {os.path.basename(weights_file)} has {len(unexpected)} "
                f"keys the model has no place for: {_listing(unexpected)}."
            )
        missing = _adapter_keys(list(result.missing_keys), name)
        if missing:
            raise ValueError(
                f"adapter weights are missing for {len(missing)} parameters of the injected modules "
                f"({os.path.basename(weights_file)} does not cover {ADAPTER_CONFIG}'s target_modules): "
                f"{_listing(missing)}."
            )
        for _, layer in _tuner_layers(model):
            layer.to(first.dtype)
            layer.set_adapter([*active, name])  # the others keep their weights
            if disabled:
                layer.enable_adapters(False)
    except BaseException:
        before.restore(model, name)
        raise
    return name


class _Snapshot:
    """What a failed :func:`load_lora_weights` must put back: which modules were LoRA layers (and their active
    adapters), the adapter configs, the ``requires_grad`` flags."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = {n: list(layer.active_adapters) for n, layer in _tuner_layers(model)}
        self.configs = dict(model.peft_config) if hasattr(model, "peft_config") else None
        self.requires_grad = requires_grad_flags(model)

    def restore(self, model: torch.nn.Module, name: str) -> None:
        for dotted, layer in _tuner_layers(model):
            if dotted not in self.layers:  # wrapped by this load: put the original module back
                _replace(model, dotted, layer.get_base_layer())
                continue
            layer.set_adapter(self.layers[dotted])
            if name in layer._all_available_adapter_names():
                layer.delete_adapter(name)
        if self.configs is None:
            if hasattr(model, "peft_config"):
                del model.peft_config
        else:
            model.peft_config.clear()
            model.peft_config.update(self.configs)
        for n, p in model.named_parameters():
            if n in self.requires_grad:
                p.requires_grad_(self.requires_grad[n])


def _names_arg(names: Union[str, list[str]], argument: str, model: torch.nn.Module) -> list[str]:
    """``names`` as a list of loaded adapter names; ``ValueError`` naming ``argument`` for unknown ones."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"`{argument}` {unknown} are not loaded; loaded: {known}.")
    return names


def set_adapters(
    model: torch.nn.Module,
    names: Union[str, list[str]],
    weights: Optional[Union[float, list[float]]] = None,
) -> None:
    """Activate ``names`` (all others off) and set each adapter's weight (a multiplier of ``lora_alpha / r``)."""
    names = _names_arg(names, "adapter_names", model)
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


def get_active_adapters(model: torch.nn.Module) -> list[str]:
    """Names of the active adapters (``[]`` when none is loaded), also while LoRA is disabled."""
    layers = _tuner_layers(model)
    return list(layers[0][1].active_adapters) if layers else []


def _require_adapters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError("no LoRA adapter is loaded: call `load_lora_weights` first.")
    return layers


def fuse_lora(model: torch.nn.Module, names: Optional[list[str]] = None) -> None:
    """Merge the active (or named) adapters into the base weights (``ValueError`` while LoRA is disabled)."""
    layers = _require_adapters(model)
    if names is not None:
        names = _names_arg(names, "adapter_names", model)
    if any(layer.disable_adapters for _, layer in layers):
        raise ValueError("LoRA is disabled: call `enable_lora()` before `fuse_lora()`.")
    for _, layer in layers:
        layer.merge(adapter_names=names)


def unfuse_lora(model: torch.nn.Module) -> None:
    """Subtract merged adapters from the base weights again."""
    for _, layer in _tuner_layers(model):
        if layer.merged:
            layer.unmerge()


def enable_lora(model: torch.nn.Module, enabled: bool = True) -> None:
    """Switch every loaded adapter on (``enabled``) or off (the base model's outputs), keeping them loaded.

    Fused adapters cannot be switched off (``ValueError``): they are part of the base weights until unfused.
    """
    layers = _require_adapters(model)
    if not enabled and any(layer.merged for _, layer in layers):
        raise ValueError("fused LoRA adapters cannot be disabled: call `unfuse_lora()` first.")
    for _, layer in layers:
        layer.enable_adapters(enabled)


def disable_lora(model: torch.nn.Module) -> None:
    """``enable_lora(model, False)``: the model computes the base model's outputs until :func:`enable_lora`."""
    enable_lora(model, False)


def delete_adapters(
    model: torch.nn.Module, names: Union[str, list[str]], requires_grad: Optional[dict[str, bool]] = None
) -> None:
    """Remove the adapters ``names`` (the others stay loaded and active as they were); deleting the last adapter
    restores the base model, as :func:`unload_lora_weights` does (with ``requires_grad``). Fused adapters must be
    unfused first."""
    names = _names_arg(names, "adapter_names", model)
    layers = _tuner_layers(model)
    fused = sorted({n for _, layer in layers for n in layer.merged_adapters if n in names})
    if fused:
        raise ValueError(f"`adapter_names` {fused} are fused: call `unfuse_lora()` before deleting them.")
    if set(names) >= set(adapter_names(model)):
        unload_lora_weights(model, requires_grad)
        return
    active = [n for n in get_active_adapters(model) if n not in names]
    for _, layer in layers:
        layer.set_adapter(active)  # first, so that peft does not pick a new active adapter itself
        for n in names:
            layer.delete_adapter(n)
    for dotted, layer in _tuner_layers(model):
        if not layer._all_available_adapter_names():  # it only held deleted adapters
            _replace(model, dotted, layer.get_base_layer())
    for n in names:
        model.peft_config.pop(n, None)


def unload_lora_weights(model: torch.nn.Module, requires_grad: Optional[dict[str, bool]] = None) -> None:
    """Replace every LoRA layer by its base layer (unmerging first) and forget the adapter configs; the parameters
    named in ``requires_grad`` (the :func:`requires_grad_flags` taken before the first adapter was loaded) get their
    flags back."""
    for name, layer in _tuner_layers(model):
        if layer.merged:
            layer.unmerge()
        _replace(model, name, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
    for n, p in model.named_parameters():
        if requires_grad and n in requires_grad:
            p.requires_grad_(requires_grad[n])


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


class DFMLoraLoaderMixin:
    """LoRA methods of a pipeline, diffusers style (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ...):
    each acts on ``self.model`` in place, through peft's API. Adapters are PEFT LoRA folders or Hub repos
    (``adapter_config.json`` + ``adapter_model.safetensors``).

    The pipeline keeps the ``requires_grad`` flags of its model from before the first adapter was loaded, and gives
    them back when the last adapter goes (unload, or delete of the last one).
    """

    model: torch.nn.Module
    #: (weak reference to the model, its ``requires_grad`` flags before the first adapter), or None
    _lora_base_flags: Optional[tuple[Any, dict[str, bool]]] = None

    def _base_requires_grad(self) -> Optional[dict[str, bool]]:
        """The flags kept for ``self.model`` (None when they were taken for another model, or never)."""
        kept = self._lora_base_flags
        return kept[1] if kept is not None and kept[0]() is self.model else None

    def load_lora_weights(
        self, pretrained_model_name_or_path: Union[str, os.PathLike], adapter_name: Optional[str] = None, **kwargs: Any
    ) -> None:
        """Load a PEFT LoRA adapter (folder or Hub id with ``adapter_config.json`` + safetensors) into the model.

        ``adapter_name`` defaults to ``adapter_<n>``; ``revision``, ``cache_dir``, ``token``, ``local_files_only``
        and ``force_download`` apply to Hub ids. The new adapter is activated alongside the active ones. An adapter
        that does not fit (weights missing for an injected module, unexpected keys) raises ``ValueError`` naming the
        keys; a failed load leaves the model exactly as it was.
        """
        flags = None if adapter_names(self.model) else requires_grad_flags(self.model)
        load_lora_weights(self.model, str(pretrained_model_name_or_path), adapter_name, **kwargs)
        if flags is not None:
            self._lora_base_flags = (weakref.ref(self.model), flags)

    def set_adapters(
        self, adapter_names: Union[str, list[str]], adapter_weights: Optional[Union[float, list[float]]] = None
    ) -> None:
        """Activate the named adapters, optionally with per-adapter weights (scale of the LoRA update)."""
        set_adapters(self.model, adapter_names, adapter_weights)

    def fuse_lora(self, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active (or named) adapters into the base weights."""
        fuse_lora(self.model, adapter_names)

    def unfuse_lora(self) -> None:
        """Undo :meth:`fuse_lora`."""
        unfuse_lora(self.model)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the model becomes exactly the base model again (unfused adapters leave no trace)."""
        unload_lora_weights(self.model, self._base_requires_grad())
        self._lora_base_flags = None

    def delete_adapters(self, adapter_names: Union[str, list[str]]) -> None:
        """Remove the named adapters; the others stay loaded and active as they were (unfuse fused ones first)."""
        delete_adapters(self.model, adapter_names, self._base_requires_grad())
        if not _tuner_layers(self.model):  # the last one went: the base flags are back
            self._lora_base_flags = None

    def disable_lora(self) -> None:
        """Switch every adapter off (the model computes the base model's outputs); :meth:`enable_lora` undoes it."""
        disable_lora(self.model)

    def enable_lora(self) -> None:
        """Switch the adapters back on after :meth:`disable_lora`."""
        enable_lora(self.model, True)

    def get_active_adapters(self) -> list[str]:
        """Names of the active adapters (``[]`` when none is loaded)."""
        return get_active_adapters(self.model)
