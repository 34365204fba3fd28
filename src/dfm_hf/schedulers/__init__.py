"""Schedulers: the Discrete Flow Matching sampler and the confidence-ordered unmasking baseline."""

from .scheduling_confidence import ConfidenceUnmaskingScheduler, ConfidenceUnmaskingSchedulerOutput
from .scheduling_discrete_flow import DiscreteFlowScheduler, DiscreteFlowSchedulerOutput

__all__ = [
    "ConfidenceUnmaskingScheduler",
    "ConfidenceUnmaskingSchedulerOutput",
    "DiscreteFlowScheduler",
    "DiscreteFlowSchedulerOutput",
]
