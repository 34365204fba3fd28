"""Which foreign families we convert, and the checks every config conversion shares.

A configuration value we do not implement is refused with a ``ValueError`` naming the key and the accepted values.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any, Optional

from ..models.rope_parameters import DEFAULT_ROPE_THETA, ROPE_PARAMETER_KEYS, ROPE_TYPES

#: ``config.json`` ``model_type`` -> family name, for the released masked-diffusion LMs we convert.
RELEASED_MODEL_TYPES: dict[str, str] = {
    "llada": "llada",
    "Dream": "dream",
    "bd3lm": "bd3lm",
    "mdlm": "mdlm",
    "sdar": "sdar",
    "Fast_dLLM_Qwen": "fast_dllm_v2",
    "llada2_moe": "llada2",
}
#: ``model_type`` values of the causal LMs :func:`dfm_hf.conversion.causal_lm_to_dfm` converts.
CAUSAL_LM_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
#: Checkpoint tensors that carry no learned values (rotary frequency tables some exporters save; BD3-LM's training-time
#: noise clipping bounds ``sampling_eps_min`` / ``sampling_eps_max``): skipped.
IGNORED_TENSOR_PATTERN = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^sampling_eps_(min|max)$")


def detect_family(config: dict[str, Any]) -> str:
    """The released family of a ``config.json`` dict: ``"llada"`` or ``"dream"``; ``ValueError`` otherwise."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in RELEASED_MODEL_TYPES:
        raise ValueError(
            f"`model_type` {model_type!r} is not a released masked-diffusion LM we convert; accepted: "
            f"{sorted(RELEASED_MODEL_TYPES)}, or 'dfm' (our own checkpoints). Causal LMs "
            f"({', '.join(CAUSAL_LM_MODEL_TYPES)}) convert with `DFMForMaskedGeneration.from_causal_lm`."
        )
    return RELEASED_MODEL_TYPES[model_type]


def _refuse(family: str, key: str, value: Any, accepted: str) -> ValueError:
    """The error for a config value we do not implement (returned, for the caller to raise)."""
    return ValueError(f"{family} config: `{key}` = {value!r} is not supported; accepted: {accepted}.")


def _require(config: dict[str, Any], key: str, family: str) -> Any:
    """``config[key]``; ``ValueError`` naming the key when it is missing or None."""
    if config.get(key) is None:
        raise ValueError(f"{family} config: `{key}` is missing (required to convert the checkpoint).")
    return config[key]


def _check_values(config: dict[str, Any], family: str, allowed: dict[str, tuple[Any, ...]]) -> None:
    """Refuse every key of ``allowed`` whose value (when present) is not one of the accepted ones."""
    for key, accepted in allowed.items():
        if key in config and config[key] not in accepted:
            raise _refuse(family, key, config[key], " or ".join(repr(a) for a in accepted))


def _rope_settings(
    config: dict[str, Any], family: str, max_positions: int, scaling: bool = True
) -> tuple[dict[str, Any], int]:
    """``(rope_parameters, max_position_embeddings)`` of ``DFMConfig`` for a config dict with ``max_positions``.

    The RoPE is the dict's ``rope_parameters`` (transformers 5.x) or ``rope_scaling`` (its legacy name, legacy
    ``type`` key included) with ``rope_theta`` (inside, else at the top level, else 10000): every type of
    :data:`~dfm_hf.models.configuration_dfm.ROPE_TYPES`, keeping the keys transformers reads for it. ``dynamic``
    rescales beyond the source's ``max_position_embeddings`` (transformers' definition): that length becomes its
    ``original_max_position_embeddings`` and the accepted length grows to ``factor`` times it. Refused: other types,
    ``partial_rotary_factor`` other than 1, and any scaling where ``scaling=False`` (a family whose own code has none).
    """
    key = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    source = config.get(key) or {}
    if not isinstance(source, dict):
        raise _refuse(family, key, source, f"None or a dict with a `rope_type` in {list(ROPE_TYPES)}")
    rope_type = source.get("rope_type", source.get("type", "default"))
    accepted = list(ROPE_TYPES) if scaling else ["default"]
    if rope_type not in accepted:
        raise _refuse(family, f"{key}.rope_type", rope_type, f"{accepted} (plain or scaled rotary embeddings)")
    partial = source.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise _refuse(family, f"{key}.partial_rotary_factor", partial, "1.0 (the whole head is rotated)")
    required, optional = ROPE_PARAMETER_KEYS[rope_type]
    parameters = {k: source[k] for k in required + optional if source.get(k) is not None}
    theta = source.get("rope_theta", config.get("rope_theta"))
    parameters.update(rope_type=rope_type, rope_theta=DEFAULT_ROPE_THETA if theta is None else theta)
    if rope_type == "dynamic":
        factor = parameters.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
            raise _refuse(family, f"{key}.factor", factor, "a number >= 1")
        parameters["original_max_position_embeddings"] = int(max_positions)
        max_positions = int(max_positions * factor)
    return parameters, int(max_positions)


def _special_ids(config: dict[str, Any], **defaults: Optional[int]) -> dict[str, Any]:
    """``bos/eos/pad/mask_token_id`` of ``config``, each falling back to ``defaults`` when absent or None."""
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        value = config.get(key)
        ids[key] = defaults.get(key) if value is None else value
    return ids


def _format_names(names: Collection[str], limit: int = 12) -> str:
    """``names`` sorted and joined, the first ``limit`` only (with the total when there are more)."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
