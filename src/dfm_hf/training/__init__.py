"""Training helpers: the DFM data collator (t, x_t, labels, couplings) and the losses (CE, generalized KL)."""

from __future__ import annotations

from .collator import COUPLINGS, TIME_SAMPLINGS, DFMDataCollator
from .losses import (
    IGNORE_INDEX,
    compute_dfm_loss,
    dfm_loss,
    generalized_kl_loss,
    kappa_rate,
    masked_cross_entropy_loss,
)

__all__ = [
    "COUPLINGS",
    "IGNORE_INDEX",
    "TIME_SAMPLINGS",
    "DFMDataCollator",
    "compute_dfm_loss",
    "dfm_loss",
    "generalized_kl_loss",
    "kappa_rate",
    "masked_cross_entropy_loss",
]
