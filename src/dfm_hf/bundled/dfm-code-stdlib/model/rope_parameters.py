"""The ``rope_parameters`` of a :class:`~dfm_hf.DFMConfig`: the RoPE types and keys we compute, their standard form
and their checks (transformers' ``RopeParameters`` names and meanings).

Like the configuration, this file imports only the standard library: it is copied next to the weights with it.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

DEFAULT_ROPE_THETA = 10000.0
#: ``rope_parameters["rope_type"]`` -> (required keys, optional keys) besides ``rope_type``, ``rope_theta`` and
#: ``partial_rotary_factor`` (see :func:`rotary_dim`). The names and meanings are those of transformers'
#: ``RopeParameters``; ``dynamic`` may also carry ``original_max_position_embeddings``, the length beyond which it
#: rescales (default: ``max_position_embeddings``, where it never does, longer inputs being refused).
ROPE_PARAMETER_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ("original_max_position_embeddings",)),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
    "llama3": (("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"), ()),
}
ROPE_TYPES = tuple(ROPE_PARAMETER_KEYS)


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def standard_rope_parameters(
    rope_parameters: Any, rope_theta: Any, rope_scaling: Any, max_position_embeddings: int
) -> dict[str, Any]:
    """A copy of ``rope_parameters`` (or of its legacy name ``rope_scaling``) with ``rope_type`` (legacy ``type``;
    default ``"default"``) and ``rope_theta`` (the argument, else :data:`DEFAULT_ROPE_THETA`) filled in, and
    ``original_max_position_embeddings`` defaulting to ``max_position_embeddings`` where the type needs it."""
    if rope_scaling is not None:
        if rope_parameters is not None:
            raise ValueError("Give `rope_parameters` only: `rope_scaling` is its legacy name, not a second setting.")
        rope_parameters = rope_scaling
    if rope_parameters is None:
        rope_parameters = {}
    if not isinstance(rope_parameters, dict):
        raise ValueError(
            f"`rope_parameters` must be None or a dict with a `rope_type` in {list(ROPE_TYPES)}, got "
            f"{rope_parameters!r}."
        )
    parameters = copy.deepcopy(rope_parameters)
    legacy_type = parameters.pop("type", None)
    if legacy_type is not None and parameters.setdefault("rope_type", legacy_type) != legacy_type:
        raise ValueError(
            f"`rope_parameters` has `rope_type` {parameters['rope_type']!r} and `type` {legacy_type!r} "
            "(its legacy name): give `rope_type` only."
        )
    parameters.setdefault("rope_type", "default")
    if rope_theta is not None:
        if "rope_theta" in parameters and parameters["rope_theta"] != rope_theta:
            raise ValueError(
                f"`rope_theta` ({rope_theta!r}) differs from `rope_parameters['rope_theta']` "
                f"({parameters['rope_theta']!r}); give it once (in `rope_parameters`)."
            )
        parameters["rope_theta"] = rope_theta
    parameters.setdefault("rope_theta", DEFAULT_ROPE_THETA)
    rope_type = parameters["rope_type"]
    required = ROPE_PARAMETER_KEYS.get(rope_type, ((),))[0] if isinstance(rope_type, str) else ()
    if "original_max_position_embeddings" in required:
        parameters.setdefault("original_max_position_embeddings", max_position_embeddings)
    return parameters


def rotary_dim(head_dim: int, rope_parameters: dict[str, Any]) -> int:
    """The rotated width of a head: ``int(head_dim * rope_parameters["partial_rotary_factor"])`` (default 1, the
    whole head). The first ``rotary_dim`` dimensions of each query / key head are rotated (their two halves paired,
    transformers' and LLaDA2's convention), the others pass through unchanged."""
    return int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))


def check_rope_parameters(parameters: dict[str, Any], head_dim: int) -> None:
    """Raise ``ValueError`` naming the key unless ``parameters`` (standardised) is a RoPE we compute."""
    rope_type = parameters["rope_type"]
    if not isinstance(rope_type, str) or rope_type not in ROPE_PARAMETER_KEYS:
        raise ValueError(f"`rope_parameters['rope_type']` must be one of {list(ROPE_TYPES)}, got {rope_type!r}.")
    required, optional = ROPE_PARAMETER_KEYS[rope_type]
    accepted = ("rope_type", "rope_theta", "partial_rotary_factor") + required + optional
    unknown = sorted(set(parameters) - set(accepted))
    if unknown:
        raise ValueError(
            f"`rope_parameters` keys {unknown} are not used by rope_type {rope_type!r}; accepted keys: "
            f"{list(accepted)}."
        )
    missing = [key for key in required if parameters.get(key) is None]
    if missing:
        raise ValueError(f"`rope_parameters` with rope_type {rope_type!r} needs {missing}; required: {list(required)}.")

    def number(key: str, low: Optional[float] = None, inclusive: bool = False) -> None:
        value = parameters.get(key)
        if value is None and key != "rope_theta":
            return
        if not is_number(value) or (low is not None and (value < low or (value == low and not inclusive))):
            bound = "" if low is None else f" >= {low}" if inclusive else f" > {low}"
            raise ValueError(f"`rope_parameters['{key}']` must be a finite number{bound}, got {value!r}.")

    number("rope_theta", 0.0)
    partial = parameters.get("partial_rotary_factor", 1.0)
    width = rotary_dim(head_dim, parameters) if is_number(partial) else 0
    if not is_number(partial) or not 0 < partial <= 1 or width < 2 or width % 2:
        raise ValueError(
            f"`rope_parameters['partial_rotary_factor']` must be a number in (0, 1] whose share of head_dim "
            f"({head_dim}) is a positive even number of dimensions, got {partial!r}."
        )
    number("factor", 1.0, inclusive=True)
    for key in ("attention_factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        number(key, 0.0)
    for key in ("mscale", "mscale_all_dim"):
        number(key)
    original = parameters.get("original_max_position_embeddings")
    if original is not None and (not is_int(original) or original < 1):
        raise ValueError(
            f"`rope_parameters['original_max_position_embeddings']` must be a positive integer, got {original!r}."
        )
    if parameters.get("truncate") is not None and not isinstance(parameters["truncate"], bool):
        raise ValueError(f"`rope_parameters['truncate']` must be True, False or None, got {parameters['truncate']!r}.")
    if rope_type == "llama3" and not parameters["high_freq_factor"] > parameters["low_freq_factor"]:
        raise ValueError(
            f"`rope_parameters['high_freq_factor']` ({parameters['high_freq_factor']}) must be greater than "
            f"`rope_parameters['low_freq_factor']` ({parameters['low_freq_factor']})."
        )
    half = rotary_dim(head_dim, parameters) // 2
    for key in ("short_factor", "long_factor"):
        value = parameters.get(key)
        if value is not None and (
            not isinstance(value, (list, tuple)) or len(value) != half or not all(is_number(v) and v > 0 for v in value)
        ):
            raise ValueError(
                f"`rope_parameters['{key}']` must be a list of rotary_dim / 2 = {half} finite numbers > 0, "
                f"got {value!r}."
            )


__all__ = [
    "DEFAULT_ROPE_THETA",
    "ROPE_PARAMETER_KEYS",
    "ROPE_TYPES",
    "check_rope_parameters",
    "is_int",
    "is_number",
    "rotary_dim",
    "standard_rope_parameters",
]
