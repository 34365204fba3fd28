"""The DFM denoiser: configuration, backbone and masked-generation head, plus Auto-class registration."""

from __future__ import annotations

from .configuration_dfm import DFM_PRESETS, LOSS_TYPES, DFMConfig
from .modeling_dfm import (
    DFMForMaskedGeneration,
    DFMMaskedGenerationOutput,
    DFMModel,
    DFMPreTrainedModel,
    compute_dfm_loss,
    generalized_kl_loss,
    masked_cross_entropy_loss,
)


def register_auto_classes() -> None:
    """Register ``model_type="dfm"`` with the transformers Auto classes (idempotent).

    After this, ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` resolve DFM checkpoints in-process, and
    ``save_pretrained`` writes ``auto_map`` and copies ``configuration_dfm.py`` / ``modeling_dfm.py`` next to the
    weights, so the checkpoint loads with ``trust_remote_code=True`` where ``dfm_hf`` is not installed.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    AutoConfig.register(DFMConfig.model_type, DFMConfig, exist_ok=True)
    AutoModel.register(DFMConfig, DFMModel, exist_ok=True)
    AutoModelForMaskedLM.register(DFMConfig, DFMForMaskedGeneration, exist_ok=True)
    DFMConfig.register_for_auto_class("AutoConfig")
    DFMModel.register_for_auto_class("AutoModel")
    DFMForMaskedGeneration.register_for_auto_class("AutoModelForMaskedLM")


register_auto_classes()

__all__ = [
    "DFM_PRESETS",
    "LOSS_TYPES",
    "DFMConfig",
    "DFMForMaskedGeneration",
    "DFMMaskedGenerationOutput",
    "DFMModel",
    "DFMPreTrainedModel",
    "compute_dfm_loss",
    "generalized_kl_loss",
    "masked_cross_entropy_loss",
    "register_auto_classes",
]
