"""dfm_hf: Discrete Flow Matching for the Hugging Face ecosystem."""

from . import data, models, paths, pipelines, schedulers, training
from .models import DFMConfig, DFMForMaskedGeneration, DFMModel
from .pipelines import DFMPipeline, DFMPipelineOutput
from .schedulers import (
    ConfidenceUnmaskingScheduler,
    ConfidenceUnmaskingSchedulerOutput,
    DiscreteFlowScheduler,
    DiscreteFlowSchedulerOutput,
)

__version__ = "0.1.0"

# diffusers resolves how to load a third-party component by looking its base classes up by name in the library named
# in model_index.json (here "dfm_hf"): these aliases let it find `from_pretrained` / `save_pretrained`.
from diffusers import SchedulerMixin
from transformers import PreTrainedModel
