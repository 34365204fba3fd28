"""The DFM losses given the posterior logits: the masked cross-entropy and the mixture-path generalized KL.

Only ``torch`` is imported: this file is copied next to the weights with the modeling file (whose ``labels`` loss is
:func:`masked_cross_entropy_loss`). :mod:`dfm_hf.training.losses` computes the jump rates from a kappa schedule and
chooses the training loss.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

#: The label of a position that is not scored (masked-LM convention).
IGNORE_INDEX = -100


def _normalise(total: torch.Tensor, count: int, num_items_in_batch: Optional[Union[int, torch.Tensor]]) -> torch.Tensor:
    """``total / num_items_in_batch`` when given (Trainer gradient accumulation), else ``total / max(count, 1)``."""
    if num_items_in_batch is not None:
        denom = num_items_in_batch
        if isinstance(denom, torch.Tensor):
            denom = denom.to(total.device)
        return total / denom
    return total / max(count, 1)


def masked_cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Cross-entropy on the posterior, averaged over the scored tokens (computed in float32).

    ``loss = mean_{i: labels_i != ignore_index} -log p_{1|t}(labels_i | x_t)``, with ``p_{1|t} = softmax(logits)``.
    ``logits`` is ``(..., vocab)`` and ``labels`` is ``(...)``. With ``num_items_in_batch`` (Trainer gradient
    accumulation) the sum is divided by it instead of by the local count. No scored token gives 0.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1).to(flat.device)
    scored = labels != ignore_index
    # Only the scored rows are upcast to float32 (the full float32 logits can be large).
    total = F.cross_entropy(flat[scored].float(), labels[scored], reduction="sum")
    return _normalise(total, labels[scored].numel(), num_items_in_batch)


def generalized_kl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    kappa_rate: Union[float, torch.Tensor],
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Mixture-path generalized KL (the per-token term of Meta's ``MixturePathGeneralizedKL``), summed over the
    scored tokens and divided by their number ``K`` (or by ``num_items_in_batch``).

    Per scored token ``i`` (``labels_i != ignore_index``), with ``x1 = labels``, ``x_t = input_ids``,
    ``delta = [x_t^i == x1^i]`` and ``rate = kappa'_t / (1 - kappa_t)`` (``kappa_rate``)::

        loss_i = -rate * ( p_{1|t}(x_t^i) - delta + (1 - delta) * log p_{1|t}(x1^i) )
        loss   = (1 / K) * sum_i loss_i

    computed in float32. ``logits`` is ``(..., vocab)``; ``labels`` and ``input_ids`` are ``(...)``; ``kappa_rate``
    is a scalar, one rate per row (``(batch,)`` for ``(batch, len)`` labels) or anything broadcasting against
    ``labels``. Singular at ``t -> 1`` (train on ``t <= 1 - eps``).

    What the time integral is depends on the denominator. With the sum (``num_items_in_batch=1``) over the
    corruptible tokens of a sequence (the mask source scores its masked ones: a visible token's term is 0 when the
    model keeps it, as the samplers do), ``E_{t ~ U[0, 1]} E_{x_t}[sum_i loss_i]`` is the negative ELBO of the
    sequence, a bound on ``-log p(x1)``; divided by the number ``N`` of corruptible tokens, a denominator that does
    not depend on ``t`` (``num_items_in_batch=N``), it is the bound per token. The default ``1 / K`` is not: at the
    mask source ``K`` is the number of masked tokens, about ``(1 - kappa_t) N``, so it weights time ``t`` by a further
    ``N / K`` (a positive weight: the minimiser at each ``t``, the true posterior, is the same).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    labels = labels.to(flat.device)
    rate = torch.as_tensor(kappa_rate, dtype=torch.float32, device=flat.device)
    if rate.dim() == 1 and labels.dim() > 1 and rate.shape[0] == labels.shape[0]:
        rate = rate.view(-1, *([1] * (labels.dim() - 1)))
    rate = torch.broadcast_to(rate, labels.shape).reshape(-1)
    labels = labels.reshape(-1)
    scored = labels != ignore_index
    x1 = labels[scored]
    x_t = input_ids.reshape(-1).to(flat.device)[scored]
    log_probs = torch.log_softmax(flat[scored].float(), dim=-1)
    log_p_x1 = log_probs.gather(-1, x1.unsqueeze(-1)).squeeze(-1)
    p_xt = log_probs.gather(-1, x_t.unsqueeze(-1)).squeeze(-1).exp()
    delta = (x_t == x1).float()
    total = (-rate[scored] * (p_xt - delta + (1.0 - delta) * log_p_x1)).sum()
    return _normalise(total, x1.numel(), num_items_in_batch)


__all__ = ["IGNORE_INDEX", "generalized_kl_loss", "masked_cross_entropy_loss"]
