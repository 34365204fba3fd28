"""DFM training losses: cross-entropy on the posterior and the mixture-path generalized KL.

The loss formulas live once, in :mod:`dfm_hf.models.modeling_dfm` (that file ships as remote code and must stay
self-contained); this module re-exports them and adds the jump rate ``kappa'_t / (1 - kappa_t)`` computed from a kappa
schedule of :mod:`dfm_hf.paths`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import paths
from ..models.modeling_dfm import (
    IGNORE_INDEX,
    compute_dfm_loss,
    generalized_kl_loss,
    masked_cross_entropy_loss,
)

ScheduleLike = Union[str, paths.KappaSchedule]


def _schedule(schedule: ScheduleLike, kappa_exponent: float = 1.0) -> paths.KappaSchedule:
    if isinstance(schedule, paths.KappaSchedule):
        return schedule
    return paths.get_kappa_schedule(schedule, kappa_exponent)


def kappa_rate(
    timesteps: Union[float, torch.Tensor], schedule: ScheduleLike = "polynomial", kappa_exponent: float = 1.0
) -> torch.Tensor:
    """The jump rate ``kappa'_t / (1 - kappa_t)`` of the mixture path at ``timesteps``, as float32.

    ``schedule`` is a :class:`dfm_hf.paths.KappaSchedule` or a name for :func:`dfm_hf.paths.get_kappa_schedule`
    (``kappa_exponent`` is used with ``"polynomial"``). Infinite at ``kappa_t = 1``: keep ``t < 1``.
    """
    return _schedule(schedule, kappa_exponent).rate(timesteps).to(torch.float32)


def dfm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_ids: Optional[torch.Tensor] = None,
    timesteps: Optional[Union[float, torch.Tensor]] = None,
    loss_type: str = "ce",
    schedule: ScheduleLike = "polynomial",
    kappa_exponent: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The DFM loss of ``logits`` ``(batch, len, vocab)`` against ``labels`` ``(batch, len)`` (-100 = not scored).

    ``"ce"``: ``mean_i -log p_{1|t}(x1^i | x_t)`` over the scored tokens.
    ``"generalized_kl"``: ``mean_i -rate_t * (p_{1|t}(x_t^i) - delta + (1 - delta) * log p_{1|t}(x1^i))`` with
    ``delta = [x_t^i == x1^i]`` and ``rate_t = kappa'_t / (1 - kappa_t)`` from ``schedule`` at ``timesteps`` (one
    per row); needs ``input_ids`` (``x_t``) and ``timesteps``.
    """
    rate = None
    if loss_type == "generalized_kl":
        if timesteps is None or input_ids is None:
            raise ValueError("`timesteps` and `input_ids` are required when `loss_type` is 'generalized_kl'.")
        rate = kappa_rate(timesteps, schedule, kappa_exponent).to(logits.device)
        if rate.dim() == 1:
            rate = rate.view(-1, *([1] * (labels.dim() - 1)))
    return compute_dfm_loss(logits, labels, loss_type, input_ids=input_ids, kappa_rate=rate, ignore_index=ignore_index)


__all__ = [
    "IGNORE_INDEX",
    "compute_dfm_loss",
    "dfm_loss",
    "generalized_kl_loss",
    "kappa_rate",
    "masked_cross_entropy_loss",
]
