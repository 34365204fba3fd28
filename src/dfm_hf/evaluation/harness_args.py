"""The arguments lm-eval hands :class:`~dfm_hf.evaluation.harness.DFMLM`: model arguments (strings from the command
line) converted to their annotated types, the pipeline and scheduler they name, and the ``gen_kwargs`` of
``generate_until`` requests read into settings."""

from __future__ import annotations

import inspect
import math
import os
import typing
from collections.abc import Callable
from typing import Any, Optional, Union

import torch

from ..pipelines import DFMPipeline

__all__ = ["GEN_KWARGS", "coerce", "coerce_arguments", "generation_settings", "load_pipeline", "select_scheduler"]

#: ``gen_kwargs`` keys of lm-eval tasks that ``generate_until`` reads (others are ignored with a warning).
GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p")


def _optional_base(hint: Any) -> tuple[Any, bool]:
    """``(base type, accepts None)`` of a type hint such as ``Optional[int]``."""
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else None), type(None) in typing.get_args(hint)
    return hint, False


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the type ``hint`` of argument ``name`` (lm-eval's command line passes strings).

    ``bool`` takes true/false/1/0/yes/no, ``int`` an integral value, ``float`` a finite number, ``str`` a string;
    ``"none"`` / ``"null"`` give None where ``hint`` is optional. Other hints pass ``value`` through.

    Raises:
        ValueError: the value does not convert (the message names ``name`` and the accepted kind).
    """
    base, nullable = _optional_base(hint)
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and nullable:
        return None
    if value is None:
        if nullable:
            return None
        raise ValueError(f"`{name}` must not be None.")
    try:
        if base is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if base is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(base, base)
        raise ValueError(f"`{name}` must be {'None or ' if nullable else ''}{kind}, got {value!r}.") from None
    return value


def coerce_arguments(function: Callable[..., Any], values: dict[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    """The annotated arguments of ``function`` among ``values``, each converted by :func:`coerce` (names in
    ``skip`` and names without an annotation are left out)."""
    hints = typing.get_type_hints(function)
    return {
        name: coerce(name, value, hints[name])
        for name, value in values.items()
        if name not in skip and name in hints and name != "return"
    }


def generation_settings(
    gen_kwargs: dict[str, Any],
    *,
    gen_length: int,
    max_length: int,
    temperature: Optional[float],
    guidance_scale: float,
    warn: Callable[[str, str], None],
) -> dict[str, Any]:
    """``{"until", "gen_length", "call"}`` of one group of ``generate_until`` requests.

    ``until``: the task's stop strings (empty ones dropped); ``gen_length``: the model's, capped by the task's
    ``max_gen_toks`` (or ``max_new_tokens``); ``call``: the pipeline's sampling keywords. The temperature is the
    model's when set, else 0.0 for ``do_sample=False``, else the task's ``temperature`` when given; ``top_k`` /
    ``top_p`` follow the task; ``guidance_scale`` is passed when it is not 1.0. Unknown keys are reported through
    ``warn(key, message)``.

    Raises:
        ValueError: ``gen_kwargs`` is not a dict, ``until`` is not a string or a list of strings, ``max_gen_toks``
            is below 1, or ``gen_length`` leaves no room for a prompt in ``max_length`` positions.
    """
    if not isinstance(gen_kwargs, dict):
        raise ValueError(f"generate_until gen_kwargs must be a dict, got {type(gen_kwargs).__name__}.")
    unknown = sorted(k for k in gen_kwargs if k not in GEN_KWARGS)
    if unknown:
        warn(f"gen_kwargs:{unknown}", f"dfm_hf: generate_until ignores gen_kwargs {unknown}; it reads {GEN_KWARGS}.")
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs `until` must be a string or a list of strings, got {until!r}.")
    cap = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens"))
    if cap is not None:
        cap = coerce("max_gen_toks", cap, int)
        if cap < 1:
            raise ValueError(f"gen_kwargs `max_gen_toks` must be >= 1, got {cap}.")
        gen_length = min(gen_length, cap)
    if gen_length >= max_length:
        raise ValueError(
            f"`gen_length` ({gen_length}) leaves no room for a prompt in max_length={max_length} positions."
        )
    if temperature is None:
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        elif gen_kwargs.get("temperature") is not None:
            temperature = coerce("temperature", gen_kwargs["temperature"], float)
    call: dict[str, Any] = {}
    if temperature is not None:
        call["temperature"] = temperature
    for key, kind in (("top_k", int), ("top_p", float)):
        if gen_kwargs.get(key) is not None:
            call[key] = coerce(key, gen_kwargs[key], kind)
    if guidance_scale != 1.0:
        call["guidance_scale"] = guidance_scale
    return {"until": [s for s in until if s], "gen_length": gen_length, "call": call}


def load_pipeline(pretrained: Any, revision: Optional[str], dtype: Optional[torch.dtype]) -> DFMPipeline:
    """The pipeline of ``pretrained``: a ``DFMPipeline`` as it is (cast to ``dtype`` when given), else a folder
    (``~`` expanded) or Hub repo id loaded with ``DFMPipeline.from_pretrained`` at ``revision``.

    Raises:
        ValueError: ``pretrained`` is of another type or does not load (the message names it and the cause).
    """
    if isinstance(pretrained, DFMPipeline):
        if dtype is not None:
            pretrained.model.to(dtype)
        return pretrained
    if not isinstance(pretrained, str):
        raise ValueError(
            f"`pretrained` must be a folder, a Hub repo id or a DFMPipeline, got {type(pretrained).__name__}."
        )
    pretrained = os.path.expanduser(pretrained)
    kwargs: dict[str, Any] = {}
    if revision:
        kwargs["revision"] = revision
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return DFMPipeline.from_pretrained(pretrained, **kwargs)
    except Exception as e:  # a missing folder, an unknown Hub id, a broken checkpoint
        raise ValueError(
            f"`pretrained` {pretrained!r} could not be loaded as a DFM pipeline: {type(e).__name__}: {e}"
        ) from e


def select_scheduler(pipe: DFMPipeline, scheduler_preset: Optional[str], block_length: Optional[int]) -> Any:
    """A new scheduler for ``pipe``: a copy of its preset ``scheduler_preset`` (None: of its own scheduler), with
    ``block_length`` set when given. The pipeline's own scheduler is never changed.

    Raises:
        ValueError: an unknown preset (the message lists the pipeline's), or ``block_length`` for a scheduler
            without that setting (the message lists the presets that have it).
    """
    scheduler = pipe.scheduler
    if scheduler_preset is not None:
        if scheduler_preset not in pipe.scheduler_presets:
            raise ValueError(
                f"`scheduler_preset` must be one of this pipeline's presets {sorted(pipe.scheduler_presets)}, "
                f"got {scheduler_preset!r}."
            )
        preset = pipe.scheduler_presets[scheduler_preset]
        scheduler = type(preset).from_config(preset.config)
    if block_length is not None:
        if "block_length" not in inspect.signature(type(scheduler).__init__).parameters:
            with_blocks = sorted(
                n
                for n, s in pipe.scheduler_presets.items()
                if "block_length" in inspect.signature(type(s).__init__).parameters
            )
            raise ValueError(
                f"`block_length` needs a scheduler with a block_length setting; {type(scheduler).__name__} has "
                f"none. Pick a `scheduler_preset` that has one: {with_blocks}."
            )
        scheduler = type(scheduler).from_config(scheduler.config, block_length=block_length)
    return scheduler
