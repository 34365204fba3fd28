"""Shared sampling utilities of the schedulers: logit processing and exact categorical draws from logit rows.

Every random number comes from :mod:`dfm_hf.rng` (the generator's device, per-row generators; see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

from ..rng import GeneratorLike, draw_rows, per_row, row_counts

SAMPLING_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def check_sampling_dtype(sampling_dtype: object) -> None:
    """Raise ``ValueError`` naming ``sampling_dtype`` unless it is one of the names of :data:`SAMPLING_DTYPES`."""
    if not isinstance(sampling_dtype, str) or sampling_dtype not in SAMPLING_DTYPES:
        raise ValueError(f"`sampling_dtype` must be one of {list(SAMPLING_DTYPES)}, got {sampling_dtype!r}.")


#: Largest (rows, vocab) temporary :func:`sample_rows` builds at once (it samples row chunks of this size).
CHUNK_BYTES = 32 * 1024 * 1024

#: Largest (rows, vocab) temporary :func:`greedy_with_log_probability` builds at once (small enough for the caches).
LSE_CHUNK_BYTES = 1024 * 1024


def process_logits(
    rows: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    forbidden_token_id: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Validate (K, vocab) logit rows and return log-probabilities after temperature, top-k and top-p.

    ``log p = log_softmax(filter(logits / temperature))``; ``forbidden_token_id`` (the mask token) gets probability 0.
    Raises ``ValueError`` naming ``model_output`` on NaN or +inf logits, or a row with no allowed finite logit.
    Temperature 0 keeps only the arg-max (greedy).
    """
    converted = rows.to(dtype)
    if converted.numel() == 0:
        return converted
    # One reduction instead of isnan/isposinf passes: amax propagates NaN, so it is < inf iff no NaN and no +inf.
    if not bool(converted.amax() < math.inf):
        raise ValueError("`model_output` contains NaN or +inf logits at positions the step reads.")
    if forbidden_token_id is not None:
        if converted is rows:  # never write into the caller's tensor (packed logits already in `dtype`)
            converted = converted.clone()
        converted[:, forbidden_token_id] = -math.inf
    rows = converted
    if temperature == 0:
        # Greedy: the one-hot log-probabilities (0 at the arg-max, -inf elsewhere) are already normalised, and top-k /
        # top-p keep the arg-max, so log_softmax and the filters would return them unchanged.
        greedy = torch.full_like(rows, -math.inf)
        return greedy.scatter_(1, rows.argmax(-1, keepdim=True), 0.0)
    if temperature != 1.0:
        rows = rows / temperature
    if top_k is not None and top_k < rows.shape[-1]:
        kth = torch.topk(rows, top_k, dim=-1).values[:, -1:]
        rows = rows.masked_fill(rows < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_rows, order = torch.sort(rows, dim=-1, descending=True)
        cum = torch.softmax(sorted_rows, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_rows, dim=-1)) > top_p
        rows = rows.masked_fill(torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted), -math.inf)
    log_probs = torch.log_softmax(rows, dim=-1)
    if bool(torch.isnan(log_probs[:, 0]).any()):
        raise ValueError("`model_output` has a row whose only finite logit is the mask token (nothing to draw).")
    return log_probs


#: Column group width of :func:`max_and_argmax` (it reduces groups with ``amax``, then searches one group per row).
ARGMAX_GROUP = 128


def max_and_argmax(x: torch.Tensor, skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, first index of the max)`` of each (K, V) row of ``x`` over every column but ``skip``: ``x.max(-1)``.

    ``torch.max(dim)`` / ``torch.argmax`` on CPU run several times slower than ``amax`` over the same rows (they
    dominated a greedy step at a 32k vocabulary), so the columns are cut into groups of :data:`ARGMAX_GROUP`: one
    ``amax`` gives the group maxima (the group holding ``skip`` is reduced again without it), their max is the row's,
    and only the first group holding it is searched. Ties resolve to the first index, as ``argmax`` does; NaN
    propagates into the max (not from the ``skip`` column). ``x`` is not copied.
    """
    rows, width = x.shape
    full = (width // ARGMAX_GROUP) * ARGMAX_GROUP
    parts = []
    if full:
        parts.append(x[:, :full].view(rows, full // ARGMAX_GROUP, ARGMAX_GROUP).amax(-1))
    if full < width:
        parts.append(x[:, full:].amax(-1, keepdim=True))
    groups = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    if skip is not None:
        g, lo = skip // ARGMAX_GROUP, (skip // ARGMAX_GROUP) * ARGMAX_GROUP
        own = x[:, lo : min(lo + ARGMAX_GROUP, width)]
        columns = torch.arange(lo, lo + own.shape[1], device=x.device)
        groups[:, g] = own.masked_fill(columns == skip, -math.inf).amax(-1)
    maximum = groups.amax(-1)
    start = (groups == maximum.unsqueeze(1)).to(torch.uint8).argmax(-1) * ARGMAX_GROUP
    cols = (start.unsqueeze(1) + torch.arange(ARGMAX_GROUP, device=x.device)).clamp_(max=width - 1)
    hit = x.gather(1, cols) == maximum.unsqueeze(1)
    if skip is not None:
        hit &= cols != skip
    return maximum, start + hit.to(torch.uint8).argmax(-1)


def greedy_with_log_probability(
    rows: torch.Tensor, forbidden_token_id: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The arg-max token of each (K, vocab) logit row and its log-probability ``x[token] - logsumexp(x)``.

    With ``m = max_j x_j`` over the allowed tokens (every one but ``forbidden_token_id``, which gets probability 0),
    ``log p(token) = -log sum_j exp(x_j - m)``. No draw is made, so the rows are read in float32 (float64 rows stay
    float64) and never copied whole: ``m`` and the arg-max come from :func:`max_and_argmax`, and the sum runs over row
    chunks of at most :data:`LSE_CHUNK_BYTES`. The checks of :func:`process_logits` are read off ``m``: NaN or +inf
    in a row makes it NaN or +inf, a row with no allowed finite logit makes it -inf.
    """
    x = rows if rows.dtype == torch.float64 else rows.to(torch.float32)
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=rows.device), x.new_empty(0)
    f = forbidden_token_id if forbidden_token_id is not None and 0 <= forbidden_token_id < x.shape[1] else None
    m, tokens = max_and_argmax(x, f)
    if not bool(torch.isfinite(m).all()):
        if bool((m.isnan() | (m == math.inf)).any()):
            raise ValueError("`model_output` contains NaN or +inf logits at positions the step reads.")
        raise ValueError("`model_output` has a row whose only finite logit is the mask token (nothing to draw).")
    total = torch.empty_like(m)
    step = max(1, LSE_CHUNK_BYTES // max(x.shape[1] * x.element_size(), 1))
    for lo in range(0, x.shape[0], step):
        hi = min(lo + step, x.shape[0])
        e = (x[lo:hi] - m[lo:hi].unsqueeze(1)).exp_()
        if f is not None:
            e[:, f] = 0.0
        total[lo:hi] = e.sum(-1)
    return tokens, -total.log()


def inverse_cdf(log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact inverse-CDF draw from each row of (K, vocab) ``log_probs`` given one ``u ~ U[0, 1)`` per row.

    The draw is the first token whose cumulative probability exceeds ``u * total``; a zero-probability token (the
    mask, a filtered one) is never returned.
    """
    if log_probs.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=log_probs.device)
    cdf = log_probs.exp().cumsum_(-1)  # non-decreasing: a zero-probability token repeats its predecessor's value
    total = cdf[:, -1]
    # target < total, so some cdf entry exceeds it; the first one that does has a positive probability
    target = torch.minimum(u.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1).clamp_(max=log_probs.shape[1] - 1)


def draw_categorical(
    log_probs: torch.Tensor, counts: Optional[Sequence[int]], generator: GeneratorLike
) -> torch.Tensor:
    """One draw per row of (K, vocab) ``log_probs``; rows are grouped by batch row as ``counts`` says.

    Exact inverse-CDF sampling (:func:`inverse_cdf`) in the dtype of ``log_probs``, reading one uniform number per
    row (``torch.multinomial`` draws one exponential number per vocabulary entry, which dominated the cost of a step
    at a 32k vocabulary). With a list of generators, the rows of batch row ``b`` (``counts[b]`` of them, in order)
    use ``generator[b]``.
    """
    counts = [log_probs.shape[0]] if counts is None else counts
    u = draw_rows(counts, generator, log_probs.device, log_probs.dtype)[:, 0]
    return inverse_cdf(log_probs, u)


def _check_output(
    model_output: torch.Tensor,
    positions: torch.Tensor,
    vocab_size: Optional[int],
    counts: Optional[Sequence[int]] = None,
) -> None:
    if model_output.dim() == 3:
        if model_output.shape[:2] != positions.shape:
            raise ValueError(
                f"`model_output` of shape {tuple(model_output.shape)} does not match `sample` of shape "
                f"{tuple(positions.shape)}: expected (batch, length, vocab)."
            )
    elif model_output.dim() == 2:
        count = int(positions.sum()) if counts is None else int(sum(counts))
        if model_output.shape[0] != count:
            raise ValueError(
                f"packed `model_output` has {model_output.shape[0]} rows but the step reads {count} positions; "
                "pass full (batch, length, vocab) logits or the rows at `plan_step(...)` positions."
            )
    else:
        raise ValueError(
            f"`model_output` must be (batch, length, vocab) logits, got shape {tuple(model_output.shape)}."
        )
    if vocab_size is not None and model_output.shape[-1] != vocab_size:
        raise ValueError(
            f"`model_output` has {model_output.shape[-1]} logits per position but `vocab_size` is {vocab_size}."
        )


def rows_of(model_output: torch.Tensor, positions: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """The logit rows at the True entries of ``positions`` (row-major), from full or already-packed logits.

    ``model_output`` is either (batch, length, vocab) logits or the (K, vocab) rows at ``positions`` that a model
    called with ``logits_to_keep=positions`` returns.
    """
    _check_output(model_output, positions, vocab_size)
    return model_output[positions] if model_output.dim() == 3 else model_output


def sample_rows(
    model_output: torch.Tensor,
    positions: torch.Tensor,
    vocab_size: Optional[int],
    generator: GeneratorLike,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    forbidden_token_id: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
    chunk_bytes: int = CHUNK_BYTES,
    counts: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """``draw_categorical(process_logits(rows_of(...)))`` at the True entries of ``positions``, in chunks of rows.

    The same draws as the unchunked composition (one uniform per row, drawn up front in row-major order; every
    operation is row-wise), but the (K, vocab) temporaries in ``dtype`` never exceed ``chunk_bytes`` each, and with
    full (batch, length, vocab) logits the rows are gathered chunk by chunk, so the step's extra memory does not grow
    with the number of positions it reads. ``counts`` (rows per batch row, when the caller has them) saves a host
    sync.
    """
    _check_output(model_output, positions, vocab_size, counts)
    device = model_output.device
    if model_output.dim() == 3:
        index = positions.nonzero(as_tuple=True)
        count = index[0].numel()
    else:
        index, count = None, model_output.shape[0]
    if counts is None:
        counts = row_counts(positions) if per_row(generator) else [count]
    u = draw_rows(counts, generator, device, dtype)[:, 0]
    out = torch.empty(count, dtype=torch.long, device=device)
    width = model_output.shape[-1] * torch.finfo(dtype).bits // 8
    step = max(1, chunk_bytes // max(width, 1))
    for start in range(0, count, step):
        stop = min(start + step, count)
        if index is None:
            rows = model_output[start:stop]
        else:
            rows = model_output[index[0][start:stop], index[1][start:stop]]
        log_probs = process_logits(rows, temperature, top_k, top_p, forbidden_token_id, dtype)
        out[start:stop] = inverse_cdf(log_probs, u[start:stop])
    return out
