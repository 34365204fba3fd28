"""Monte-Carlo estimates of the ELBO of a masked discrete flow / diffusion model (the likelihoods of :class:`DFMLM`).

With ``x`` a continuation of ``n`` tokens after a context and ``L(S) = sum_{i in S} -log p(x_i | context, x with S
masked)`` (``p`` = the model's ``p_{1|t}`` at the masked positions without the mask token: the softmax over every
other token, the distribution every sampler draws from), the negative ELBO is

    NELBO = sum_{S nonempty} L(S) / (|S| * C(n, |S|))

and ``-NELBO <= log p(x | context)`` for the model's generative process: a bound, not the exact log-likelihood.
Two estimators (see :data:`ESTIMATORS`) are unbiased for it:

* ``"count"`` (LLaDA): ``l ~ U{1..n}``, ``S`` = ``l`` positions drawn uniformly, value ``(n / l) L(S)``; finite
  variance. It is the ``"ratio"`` estimator with ``1/t`` replaced by its expectation given the number of masked
  tokens (Rao-Blackwell), minus its draws that mask nothing: lower variance.
* ``"ratio"`` (MDLM-style continuous time): ``t ~ U(0, 1]``, each token masked with probability ``t``, value
  ``L(S) / t`` (0 when nothing is masked); a time-conditioned model is given the time whose ``1 - kappa`` is ``t``.
  Its variance is infinite (log-divergent, from one masked token at small ``t``): its error still shrinks with the
  number of draws, slightly slower than ``1/sqrt(draws)``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..paths import KappaSchedule

__all__ = ["ESTIMATORS", "draw_masks", "score_windows", "time_of_ratio", "windows"]

#: Estimator names: ``"count"`` (LLaDA's mask count) and ``"ratio"`` (mask ratio ``t ~ U(0, 1]``).
ESTIMATORS = ("count", "ratio")
#: Rows of the log-softmax computed at once (bounds the float32 copy of the kept logits).
_LOGSOFTMAX_ROWS = 4096

#: One scored window: its token ids and the index of its first scored token.
Window = tuple[list[int], int]


def windows(ids: Sequence[int], start: int, max_length: int) -> list[Window]:
    """Cut the scoring of ``ids[start:]`` (given ``ids[:start]``) into windows of at most ``max_length`` tokens.

    Returns ``(window ids, first scored index in the window)`` pairs. Each window scores the next ``c`` tokens
    given the ``max_length - c`` tokens before them (fewer at the start of the text), where
    ``c = min(tokens left, max_length - min(tokens before, max_length // 2))``: a text that fits is one window
    with all of its context; a longer one is scored in chunks of half a window, each conditioned on the half
    window before it. The sum of the windows' ELBOs bounds the log-likelihood of the text under the model
    restricted to that context (the chain rule, as lm-eval's rolling windows do for causal LMs).
    """
    ids = list(ids)
    out = []
    a = start
    while a < len(ids):
        c = min(len(ids) - a, max_length - min(a, max_length // 2))
        lo = max(0, a + c - max_length)
        out.append((ids[lo : a + c], a - lo))
        a += c
    return out


def time_of_ratio(ratio: torch.Tensor, kappa: KappaSchedule) -> torch.Tensor:
    """Model time ``t`` with ``1 - kappa(t) = ratio`` (the mask ratio), by 60 bisection steps on ``kappa``."""
    lo, hi = torch.zeros_like(ratio), torch.ones_like(ratio)
    target = 1.0 - ratio
    for _ in range(60):
        mid = (lo + hi) / 2
        below = kappa.kappa(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def draw_masks(
    n: int, mc_num: int, estimator: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(masked (mc_num, n) bool, weight (mc_num,), mask ratio (mc_num,))`` of one window's draws.

    ``"count"``: ``l ~ U{1..n}`` positions masked, weight ``n / l``; ``"ratio"``: ``t ~ U(0, 1]``, each position
    masked with probability ``t``, weight ``1 / t``.
    """
    if estimator == "count":
        count = torch.randint(1, n + 1, (mc_num,), generator=generator)
        ranks = torch.rand((mc_num, n), generator=generator).argsort(1).argsort(1)
        masked = ranks < count[:, None]
        return masked, n / count.double(), count.double() / n
    if estimator != "ratio":
        raise ValueError(f"`estimator` must be one of {list(ESTIMATORS)}, got {estimator!r}.")
    ratio = 1.0 - torch.rand(mc_num, generator=generator, dtype=torch.float64)  # in (0, 1]
    masked = torch.rand((mc_num, n), generator=generator, dtype=torch.float64) < ratio[:, None]
    return masked, 1.0 / ratio, ratio


@torch.no_grad()
def score_windows(
    model: torch.nn.Module,
    items: list[tuple[list[Window], torch.Generator]],
    *,
    mc_num: int,
    estimator: str,
    batch_size: int,
    mask_token_id: int,
    kappa: Optional[KappaSchedule] = None,
    greedy: bool = False,
    desc: str = "",
    disable_tqdm: bool = True,
) -> tuple[list[torch.Tensor], list[bool]]:
    """Per item (its windows and generator): the ``mc_num`` per-draw NELBO estimates (float64 nats, summed over
    the windows) and whether greedy unmasking of each fully masked window gives it back.

    Args:
        model: a DFM model (``model(input_ids, timesteps, attention_mask, logits_to_keep).logits``).
        items: ``(windows, generator)`` per scored text; the draws come from that generator, in window order.
        mc_num: draws per window.
        estimator: one of :data:`ESTIMATORS`.
        batch_size: model rows per forward pass (draws of several items share a batch).
        mask_token_id: the mask token.
        kappa: the kappa schedule of a time-conditioned model (its time is :func:`time_of_ratio` of the draw's
            mask ratio); None for a model that does not read the time.
        greedy: also run one fully masked row per window (the ``is_greedy`` check); else every flag is True.
        desc, disable_tqdm: the progress bar (one step per finished item).
    """
    device = next(model.parameters()).device
    masks, weights, ratios, targets, owner = [], [], [], [], []
    for item_index, (item_windows, generator) in enumerate(items):
        for ids, start in item_windows:
            m, w, r = draw_masks(len(ids) - start, mc_num, estimator, generator)
            masks.append(m)
            weights.append(w)
            ratios.append(r)
            targets.append((torch.tensor(ids, dtype=torch.long), start))
            owner.append(item_index)
    # rows: (window, draw) with draw -1 = the greedy check (everything masked); long windows first
    order = sorted(range(len(targets)), key=lambda w: -targets[w][0].shape[0])
    rows = [(w, j) for w in order for j in ([-1] if greedy else []) + list(range(mc_num))]
    values = [torch.zeros(mc_num, dtype=torch.float64) for _ in targets]
    wrong = [0] * len(targets)
    remaining = [0] * len(items)
    for w in range(len(targets)):
        remaining[owner[w]] += mc_num + (1 if greedy else 0)
    done_items = sum(1 for left in remaining if left == 0)  # nothing to score (empty continuations)
    bar = tqdm(total=len(items), desc=desc, disable=disable_tqdm, file=sys.stderr, dynamic_ncols=True)
    bar.n = done_items
    for b0 in range(0, len(rows), batch_size):
        batch = rows[b0 : b0 + batch_size]
        width = max(targets[w][0].shape[0] for w, _ in batch)
        clean = torch.full((len(batch), width), mask_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        keep = torch.zeros((len(batch), width), dtype=torch.bool)
        ratio = torch.ones(len(batch), dtype=torch.float64)
        for r, (w, j) in enumerate(batch):
            ids, start = targets[w]
            end = ids.shape[0]
            clean[r, :end] = ids
            attention[r, :end] = 1
            if j < 0:
                keep[r, start:end] = True
            else:
                keep[r, start:end] = masks[w][j]
                ratio[r] = ratios[w][j]
        per_row = torch.zeros(len(batch), dtype=torch.float64)
        misses = torch.zeros(len(batch), dtype=torch.long)
        if bool(keep.any()):
            per_row, misses = _masked_nll(model, clean, keep, attention, ratio, mask_token_id, kappa, device)
        for r, (w, j) in enumerate(batch):
            if j < 0:
                wrong[w] += int(misses[r])
            else:
                values[w][j] = weights[w][j] * per_row[r]
            remaining[owner[w]] -= 1
            if remaining[owner[w]] == 0:
                done_items += 1
        bar.n = done_items
        bar.refresh()
    bar.close()
    draws = [torch.zeros(mc_num, dtype=torch.float64) for _ in items]
    is_greedy = [True] * len(items)
    for w, item_index in enumerate(owner):
        draws[item_index] += values[w]
        is_greedy[item_index] = is_greedy[item_index] and wrong[w] == 0
    return draws, is_greedy


def _masked_nll(
    model: torch.nn.Module,
    clean: torch.Tensor,
    keep: torch.Tensor,
    attention: torch.Tensor,
    ratio: torch.Tensor,
    mask_token_id: int,
    kappa: Optional[KappaSchedule],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of one batch: the summed NLL (float64) of the clean tokens at the ``keep`` positions, masked, and
    how many of them are not the argmax; both over every token but the mask token, which no sampler draws
    (``-log p(x) = logsumexp_{v != mask} logit_v - logit_x``; a clean token that is the mask token has NLL ``inf``)."""
    x = clean.masked_fill(keep, mask_token_id)
    timesteps = None if kappa is None else time_of_ratio(ratio, kappa).float().to(device)
    logits = model(
        input_ids=x.to(device),
        timesteps=timesteps,
        attention_mask=None if bool(attention.all()) else attention.to(device),
        logits_to_keep=keep.to(device),
    ).logits
    logits[:, mask_token_id] = -torch.inf  # the model's own output tensor: excluded as the samplers exclude it
    gold = clean[keep].to(device)
    nll = torch.empty(gold.shape[0], dtype=torch.float64)
    miss = torch.empty(gold.shape[0], dtype=torch.bool)
    for k0 in range(0, gold.shape[0], _LOGSOFTMAX_ROWS):
        part = logits[k0 : k0 + _LOGSOFTMAX_ROWS].float()
        g = gold[k0 : k0 + _LOGSOFTMAX_ROWS]
        picked = part.gather(1, g[:, None]).squeeze(1)
        nll[k0 : k0 + part.shape[0]] = (torch.logsumexp(part, -1) - picked).double().cpu()
        miss[k0 : k0 + part.shape[0]] = (part.argmax(-1) != g).cpu()
    row_of = keep.nonzero()[:, 0]
    per_row = torch.zeros(clean.shape[0], dtype=torch.float64).index_add_(0, row_of, nll)
    misses = torch.zeros(clean.shape[0], dtype=torch.long).index_add_(0, row_of, miss.long())
    return per_row, misses
