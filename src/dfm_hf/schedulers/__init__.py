"""Schedulers: the Discrete Flow Matching sampler and the confidence-ordered unmasking baseline (names resolve
lazily: ``dfm_hf.schedulers.utils`` alone does not import diffusers)."""

from __future__ import annotations

from .._lazy import lazy_attributes

_EXPORTS = {
    "ConfidenceUnmaskingScheduler": ".scheduling_confidence",
    "ConfidenceUnmaskingSchedulerOutput": ".scheduling_confidence",
    "DiscreteFlowScheduler": ".scheduling_discrete_flow",
    "DiscreteFlowSchedulerOutput": ".scheduling_discrete_flow",
    "DiscreteSchedulerOutput": ".diffusers_convention",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
