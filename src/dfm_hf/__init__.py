"""dfm_hf: Discrete Flow Matching for the Hugging Face ecosystem."""

from . import paths
from .schedulers import (
    ConfidenceUnmaskingScheduler,
    ConfidenceUnmaskingSchedulerOutput,
    DiscreteFlowScheduler,
    DiscreteFlowSchedulerOutput,
)

__version__ = "0.1.0"
