"""`DFMGenerationConfig`: the settings of :meth:`DFMForMaskedGeneration.generate`, saved as ``generation_config.json``
next to the model weights.

It subclasses transformers' ``GenerationConfig`` for its file format (``save_pretrained`` / ``from_pretrained``,
``to_dict``, ``update``) but holds only the fields a discrete flow model reads: the autoregressive fields of the parent
(beams, repetition penalties...) do not apply and are refused as unknown keys. The sampler is a scheduler preset name
or a scheduler config: :meth:`DFMGenerationConfig.build_scheduler` makes the scheduler that runs the call.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional, Union

from transformers import GenerationConfig

from ..schedulers.utils import validate_block_length, validate_num_inference_steps, validate_sampling_args

#: The fields of a :class:`DFMGenerationConfig` and their defaults (``None``: the sampler's own value).
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 64,
    "num_inference_steps": 64,
    "block_length": None,
    "temperature": None,
    "top_k": None,
    "top_p": None,
    "confidence_threshold": None,
    "guidance_scale": 1.0,
    "sampler": None,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}
#: Bookkeeping keys transformers writes into ``generation_config.json``.
_METADATA = ("transformers_version", "_from_model_config")
#: The scheduler settings a config field overrides, when set.
_SCHEDULER_OVERRIDES = ("temperature", "top_k", "top_p", "block_length", "confidence_threshold")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _is_token_id(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def _token_ids_ok(name: str, value: Any) -> bool:
    """Whether ``value`` may be the special-token field ``name``: None, a token id, or (EOS) a non-empty list."""
    if value is None or _is_token_id(value):
        return True
    many = name == "eos_token_id" and isinstance(value, (list, tuple)) and len(value) > 0
    return many and all(_is_token_id(v) for v in value)


class DFMGenerationConfig(GenerationConfig):
    """Settings of :meth:`~dfm_hf.DFMForMaskedGeneration.generate` (``model.generation_config``).

    Args:
        max_new_tokens: tokens generated after the prompt (default 64; 0 when the prompt holds mask tokens to infill).
        num_inference_steps: scheduler steps, an upper bound on the model calls (default 64); a block-diffusion model
            splits them over its blocks.
        block_length: semi-autoregressive blocks of this many positions (the sampler's ``block_length``); None keeps
            the sampler's.
        temperature, top_k, top_p: override the sampler's; None keeps the sampler's.
        confidence_threshold: commit every position whose confidence exceeds it (a
            :class:`~dfm_hf.ConfidenceUnmaskingScheduler` sampler only); None keeps the sampler's.
        guidance_scale: classifier-free guidance ``uncond + guidance_scale * (cond - uncond)`` (1.0 = off).
        sampler: the scheduler: None (:class:`~dfm_hf.DiscreteFlowScheduler` with its defaults: DFM Euler, linear
            kappa), a preset name (``"linear-euler"``, ``"cubic-euler"``, ``"cubic-corrector"``, ``"confidence"``,
            ``"confidence-blocks"``), a scheduler config dict naming its class (``{"_class_name":
            "ConfidenceUnmaskingScheduler", "remasking": "low_confidence", ...}``, the content of a
            ``scheduler_config.json``), or a dfm_hf scheduler instance (stored as its config dict). Its
            ``mask_token_id`` and ``vocab_size`` default to the model's.
        pad_token_id, bos_token_id, eos_token_id: special tokens (default: the model config's); a block-diffusion row
            stops after the block in which it generates ``eos_token_id``.

    Unknown keys raise ``ValueError`` naming the accepted fields.
    """

    def __init__(self, **kwargs: Any) -> None:
        # GenerationConfig.__init__ is not called: its autoregressive fields do not apply (transformers'
        # DiffusionGemmaGenerationConfig does the same)
        for name, default in GENERATION_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.sampler = _sampler_setting(self.sampler)
        kwargs.pop("_commit_hash", None)
        for name in _METADATA:
            setattr(self, name, kwargs.pop(name, None))
        if kwargs:
            raise ValueError(
                f"DFMGenerationConfig got unknown keys {sorted(kwargs)}; it accepts {sorted(GENERATION_DEFAULTS)}."
            )
        self.validate()

    def validate(self, strict: bool = False, user_set_attributes: Optional[set[str]] = None, **_: Any) -> None:
        """Raise ``ValueError`` naming the first invalid field and its accepted values (``strict`` and
        ``user_set_attributes`` belong to the parent's signature: every problem here is an error)."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be an integer >= 0, got {self.max_new_tokens!r}.")
        validate_num_inference_steps(self.num_inference_steps)
        validate_block_length(self.block_length)
        temperature = 0.0 if self.temperature is None else self.temperature
        validate_sampling_args(temperature, self.top_k, self.top_p)
        if self.confidence_threshold is not None and not _is_number(self.confidence_threshold):
            raise ValueError(
                f"`confidence_threshold` must be None or a finite number, got {self.confidence_threshold!r}."
            )
        if not _is_number(self.guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number (1.0 = off), got {self.guidance_scale!r}.")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if not _token_ids_ok(name, getattr(self, name)):
                accepted = "a token id or a non-empty list of them" if name == "eos_token_id" else "a token id >= 0"
                raise ValueError(f"`{name}` must be None or {accepted}, got {getattr(self, name)!r}.")
        self.sampler = _sampler_setting(self.sampler)

    @classmethod
    def from_model_config(cls, model_config: Any) -> DFMGenerationConfig:
        """The default config of a model: the defaults, with the model config's pad, bos and eos token ids."""
        values = model_config if isinstance(model_config, dict) else model_config.to_dict()
        names = ("pad_token_id", "bos_token_id", "eos_token_id")  # an id that is no token id (-1) stays unset
        tokens = {k: values.get(k) for k in names if _token_ids_ok(k, values.get(k))}
        config = cls(**tokens, _from_model_config=True)
        config._original_object_hash = hash(config)
        return config

    def build_scheduler(self, mask_token_id: Optional[int], vocab_size: int) -> Any:
        """The scheduler this config names (``sampler``), with the model's ``mask_token_id`` and ``vocab_size`` where
        the sampler leaves them unset and the set fields of ``temperature``, ``top_k``, ``top_p``, ``block_length``,
        ``confidence_threshold`` applied. ``ValueError`` when the sampler disagrees with the model."""
        from ..schedulers.presets import PRESET_CLASSES, PRESET_SPECS

        if self.sampler is None:
            cls, settings = PRESET_CLASSES["DiscreteFlowScheduler"], {}
        elif isinstance(self.sampler, str):
            cls, settings, _ = PRESET_SPECS[self.sampler]
        else:
            cls = PRESET_CLASSES[self.sampler["_class_name"]]
            settings = {k: v for k, v in self.sampler.items() if not k.startswith("_")}
        settings = dict(settings)
        if settings.get("source_distribution", "mask") == "mask":
            if settings.get("mask_token_id") is None:
                settings["mask_token_id"] = mask_token_id
            elif mask_token_id is not None and settings["mask_token_id"] != mask_token_id:
                raise ValueError(
                    f"`sampler` mask_token_id={settings['mask_token_id']} disagrees with the model's {mask_token_id}."
                )
        if settings.get("vocab_size") is None:
            settings["vocab_size"] = vocab_size
        elif settings["vocab_size"] != vocab_size:
            raise ValueError(f"`sampler` vocab_size={settings['vocab_size']} disagrees with the model's {vocab_size}.")
        accepted = inspect.signature(cls.__init__).parameters
        for name in _SCHEDULER_OVERRIDES:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in accepted:
                raise ValueError(f"`{name}` does not apply to a {cls.__name__} sampler; leave it None.")
            settings[name] = value
        return cls(**settings)


def _sampler_setting(sampler: Any) -> Union[None, str, dict[str, Any]]:
    """``sampler`` as stored: None, a preset name or a config dict naming its class (a scheduler instance becomes its
    config dict). ``ValueError`` naming the accepted values otherwise."""
    if sampler is None:
        return None
    if isinstance(sampler, str):
        from ..schedulers.presets import PRESET_SPECS

        if sampler not in PRESET_SPECS:
            raise ValueError(
                f"`sampler` must be None, a preset in {sorted(PRESET_SPECS)} or a config dict, got {sampler!r}."
            )
        return sampler
    from ..schedulers.presets import PRESET_CLASSES

    if isinstance(sampler, tuple(PRESET_CLASSES.values())):
        config = {k: v for k, v in sampler.config.items() if not k.startswith("_")}
        sampler = {"_class_name": type(sampler).__name__, **config}
    if not isinstance(sampler, dict):
        raise ValueError(
            "`sampler` must be None, a preset name, a scheduler config dict or a dfm_hf scheduler, got "
            f"{type(sampler).__name__}."
        )
    cls = PRESET_CLASSES.get(sampler.get("_class_name"))
    if cls is None:
        raise ValueError(
            f"`sampler['_class_name']` must be one of {sorted(PRESET_CLASSES)}, got {sampler.get('_class_name')!r}."
        )
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(k for k in sampler if not k.startswith("_") and k not in accepted)
    if unknown:
        raise ValueError(
            f"`sampler` has keys {unknown} that {cls.__name__} does not take; it takes {sorted(accepted)}."
        )
    return dict(sampler)


__all__ = ["DFMGenerationConfig", "GENERATION_DEFAULTS"]
