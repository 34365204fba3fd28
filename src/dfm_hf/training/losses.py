"""The training loss, chosen by the training code: cross-entropy on the posterior, the mixture-path generalized KL,
or the ``1/t``-weighted masked cross-entropy of MDLM / LLaDA.

The CE and generalized-KL formulas live once, in :mod:`dfm_hf.models.losses` (shipped with the modeling file as
remote code); this module adds the jump rate ``kappa'_t / (1 - kappa_t)`` computed from a kappa schedule of
:mod:`dfm_hf.paths`, the rate-weighted CE of ``--loss_weighting inverse_t``, and the choice among them
(:data:`LOSS_TYPES`, :func:`dfm_loss`, :func:`batch_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch

from .. import paths
from ..models.losses import IGNORE_INDEX, generalized_kl_loss, masked_cross_entropy_loss

ScheduleLike = Union[str, paths.KappaSchedule]

#: ``--loss`` values: ``"ce"`` (:func:`masked_cross_entropy_loss`) or ``"generalized_kl"``
#: (:func:`generalized_kl_loss`). The training code chooses the loss; the model config does not carry it.
LOSS_TYPES = ("ce", "generalized_kl")
#: ``--loss_weighting`` values: ``"none"`` (the loss of ``--loss`` as is) or ``"inverse_t"`` (see
#: :func:`inverse_t_cross_entropy_loss`).
LOSS_WEIGHTINGS = ("none", "inverse_t")


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
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"`loss_type` must be one of {list(LOSS_TYPES)}, got {loss_type!r}.")
    if loss_type == "ce":
        return masked_cross_entropy_loss(logits, labels, ignore_index)
    if timesteps is None or input_ids is None:
        raise ValueError("`timesteps` and `input_ids` are required when `loss_type` is 'generalized_kl'.")
    rate = kappa_rate(timesteps, schedule, kappa_exponent).to(logits.device)
    if rate.dim() == 1:
        rate = rate.view(-1, *([1] * (labels.dim() - 1)))
    return generalized_kl_loss(logits, labels, input_ids, rate, ignore_index)


def inverse_t_cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kappa_rate: torch.Tensor,
    num_tokens: Union[int, torch.Tensor],
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The ELBO-weighted masked cross-entropy of MDLM / LLaDA (``--loss_weighting inverse_t``), in float32.

    Our time convention: ``kappa_t`` is the probability that a token is revealed (holds data), so a token is masked
    with probability ``1 - kappa_t``. Per sequence of ``N`` corruptible tokens (real, not conditioning)::

        loss = (1 / N) * sum_{i masked} kappa'_t / (1 - kappa_t) * ( -log p_{1|t}(x1^i | x_t) )

    For the linear schedule ``kappa_t = t`` the weight is ``1 / (1 - t)``: LLaDA's ``1 / p_mask`` (its ``t`` is our
    ``1 - t``). Since the expected number of masked tokens is ``(1 - kappa_t) N``, its expectation over ``t`` is the
    masked-diffusion bound on the negative log-likelihood per token (the generalized KL of the mask source minus its
    ``p_{1|t}(mask)`` term, so the two agree when the model gives the mask token no probability).

    Args:
        logits: ``(K, vocab)`` logits of the scored tokens (or ``(..., vocab)`` matching ``labels``).
        labels: ``(K,)`` (or ``(...)``) targets ``x1``; ``ignore_index`` where not scored.
        kappa_rate: ``kappa'_t / (1 - kappa_t)`` of each label's row, broadcastable to ``labels``.
        num_tokens: ``N`` summed over the batch: the corruptible tokens (the denominator; not the masked count).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    labels = labels.to(flat.device)
    rate = torch.broadcast_to(torch.as_tensor(kappa_rate, dtype=torch.float32, device=flat.device), labels.shape)
    labels, rate = labels.reshape(-1), rate.reshape(-1)
    scored = labels != ignore_index
    ce = torch.nn.functional.cross_entropy(flat[scored].float(), labels[scored], reduction="none")
    denom = torch.as_tensor(num_tokens, dtype=torch.float32, device=flat.device).clamp(min=1.0)
    return (rate[scored] * ce).sum() / denom


def batch_loss(
    logits: torch.Tensor, batch: Mapping[str, torch.Tensor], loss: str = "ce", weighting: str = "none"
) -> torch.Tensor:
    """The training loss of a collated batch (:class:`~dfm_hf.training.DFMDataCollator`) from the logits of its
    scored positions only (``labels != -100``, row-major: ``model(..., logits_to_keep=labels != -100).logits``).

    With ``K`` scored tokens, ``x1`` their labels, ``x_t`` their inputs and ``rate = kappa'_t / (1 - kappa_t)`` of
    their rows:

    - ``loss="ce"``: ``(1 / K) sum_i -log p_{1|t}(x1^i | x_t)``;
    - ``loss="generalized_kl"``: ``(1 / K) sum_i -rate * (p_{1|t}(x_t^i) - delta + (1 - delta) log p_{1|t}(x1^i))``
      with ``delta = [x_t^i == x1^i]``;
    - ``weighting="inverse_t"`` (with ``loss="ce"``): :func:`inverse_t_cross_entropy_loss`, the rate-weighted CE
      divided by the number of corruptible tokens (real, not conditioning).

    Raises:
        ValueError: ``loss`` or ``weighting`` is not an accepted value, or ``inverse_t`` with another loss than CE.
    """
    if loss not in LOSS_TYPES:
        raise ValueError(f"`loss` must be one of {list(LOSS_TYPES)}, got {loss!r}.")
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {list(LOSS_WEIGHTINGS)}, got {weighting!r}.")
    scored = batch["labels"] != IGNORE_INDEX
    labels = batch["labels"][scored].to(logits.device)
    rate = batch["kappa_rate"][:, None].expand(scored.shape)[scored].to(logits.device)
    if weighting == "inverse_t":
        if loss != "ce":
            raise ValueError("`weighting` 'inverse_t' weights the cross-entropy: it needs `loss` 'ce'.")
        corruptible = (batch["attention_mask"] != 0) & ~batch["condition_mask"]
        return inverse_t_cross_entropy_loss(logits, labels, rate, corruptible.sum())
    if loss == "ce":
        return masked_cross_entropy_loss(logits, labels)
    return generalized_kl_loss(logits, labels, batch["input_ids"][scored].to(logits.device), rate)


__all__ = [
    "LOSS_TYPES",
    "LOSS_WEIGHTINGS",
    "batch_loss",
    "dfm_loss",
    "inverse_t_cross_entropy_loss",
    "kappa_rate",
]
