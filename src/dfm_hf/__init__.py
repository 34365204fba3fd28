"""dfm_hf: Discrete Flow Matching (Gat et al., NeurIPS 2024) for the Hugging Face ecosystem.

Public names resolve lazily (see :mod:`dfm_hf._lazy`): ``import dfm_hf`` or ``import dfm_hf.paths`` imports neither
diffusers, datasets nor the training stack; ``dfm_hf.DFMPipeline`` imports the pipeline on first use. diffusers
resolves third-party pipeline components by looking their classes up by name on the library named in
``model_index.json`` ("dfm_hf"), and their loadable base classes (``SchedulerMixin``, ``PreTrainedModel``) too: both
resolve here.
"""

from __future__ import annotations

from ._lazy import lazy_attributes

__version__ = "0.1.0"

_EXPORTS = {
    # base classes diffusers looks up on the library to find how to load / save a component
    "SchedulerMixin": "diffusers",
    "PreTrainedModel": "transformers",
    # models
    "DFM_PRESETS": ".models",
    "DFMConfig": ".models",
    "DFMForMaskedGeneration": ".models",
    "DFMMaskedGenerationOutput": ".models",
    "DFMModel": ".models",
    "DFMPreTrainedModel": ".models",
    "register_auto_classes": ".models",
    # generation
    "DFMGenerationConfig": ".generation",
    # pipelines
    "DFMPipeline": ".pipelines",
    "DFMPipelineOutput": ".pipelines",
    # schedulers
    "ConfidenceUnmaskingScheduler": ".schedulers",
    "ConfidenceUnmaskingSchedulerOutput": ".schedulers",
    "DiscreteFlowScheduler": ".schedulers",
    "DiscreteFlowSchedulerOutput": ".schedulers",
    "DiscreteSchedulerOutput": ".schedulers",
    # training
    "DFMDataCollator": ".training",
    "dfm_loss": ".training",
    "generalized_kl_loss": ".models.losses",
    "kappa_rate": ".training",
    "masked_cross_entropy_loss": ".models.losses",
}
# the subpackages, importable as attributes (``dfm_hf.hub.push_lora_adapter``)
_EXPORTS.update(
    {
        name: f".{name}"
        for name in (
            "bundles",
            "conversion",
            "data",
            "evaluation",
            "generation",
            "hub",
            "models",
            "paths",
            "pipelines",
            "schedulers",
            "training",
        )
    }
)

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
