"""Training helpers: the DFM data collator (t, x_t, labels, couplings), DiffuLLaMA-style attention annealing masks
and the losses (CE, generalized KL, the 1/t-weighted masked CE)."""

from __future__ import annotations

from .collator import COUPLINGS, TIME_SAMPLINGS, DFMDataCollator, annealed_attention_mask, annealing_visible_fraction
from .losses import (
    IGNORE_INDEX,
    LOSS_WEIGHTINGS,
    compute_dfm_loss,
    dfm_loss,
    generalized_kl_loss,
    inverse_t_cross_entropy_loss,
    kappa_rate,
    masked_cross_entropy_loss,
)

__all__ = [
    "COUPLINGS",
    "IGNORE_INDEX",
    "LOSS_WEIGHTINGS",
    "TIME_SAMPLINGS",
    "DFMDataCollator",
    "annealed_attention_mask",
    "annealing_visible_fraction",
    "compute_dfm_loss",
    "dfm_loss",
    "generalized_kl_loss",
    "inverse_t_cross_entropy_loss",
    "kappa_rate",
    "masked_cross_entropy_loss",
]
