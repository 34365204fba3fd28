"""dfm_hf: Discrete Flow Matching (Gat et al., NeurIPS 2024) for the Hugging Face ecosystem.

Every submodule is imported here: diffusers resolves third-party pipeline components by importing the library
named in ``model_index.json`` ("dfm_hf") and looking the classes up on it.
"""

# diffusers finds how to load a third-party component by looking its base classes up by name in the library named
# in model_index.json (here "dfm_hf"): these aliases let it find `from_pretrained` / `save_pretrained`.
from diffusers import SchedulerMixin
from transformers import PreTrainedModel

from . import data, hub, models, paths, pipelines, schedulers, training
from .models import (
    DFM_PRESETS,
    DFMConfig,
    DFMForMaskedGeneration,
    DFMMaskedGenerationOutput,
    DFMModel,
    DFMPreTrainedModel,
    register_auto_classes,
)
from .pipelines import DFMPipeline, DFMPipelineOutput
from .schedulers import (
    ConfidenceUnmaskingScheduler,
    ConfidenceUnmaskingSchedulerOutput,
    DiscreteFlowScheduler,
    DiscreteFlowSchedulerOutput,
)
from .training import DFMDataCollator, dfm_loss, generalized_kl_loss, kappa_rate, masked_cross_entropy_loss

__version__ = "0.1.0"
