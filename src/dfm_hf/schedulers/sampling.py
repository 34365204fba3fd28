"""Shared sampling utilities of the schedulers: logit processing and exact categorical draws from logit rows.

Every random number comes from :mod:`dfm_hf.rng` (the generator's device, per-row generators; see its docstring).
The logit rows a step reads are processed in chunks of rows (:class:`LogitRows`), so a step's extra memory does not
grow with the number of positions it reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch

from ..rng import GeneratorLike, draw_rows, per_row, row_counts

SAMPLING_DTYPES = {"float64": torch.float64, "float32": torch.float32}

#: Device types without float64 arithmetic: a float64 ``sampling_dtype`` falls back to float32 there.
NO_FLOAT64_DEVICE_TYPES = ("mps",)

#: Device types where :func:`grouped_max_and_argmax` beats ``torch.max(dim)`` (elsewhere the plain reduction is used).
GROUPED_ARGMAX_DEVICE_TYPES = ("cpu",)


def check_sampling_dtype(sampling_dtype: object) -> None:
    """Raise ``ValueError`` naming ``sampling_dtype`` unless it is one of the names of :data:`SAMPLING_DTYPES`."""
    if not isinstance(sampling_dtype, str) or sampling_dtype not in SAMPLING_DTYPES:
        raise ValueError(f"`sampling_dtype` must be one of {list(SAMPLING_DTYPES)}, got {sampling_dtype!r}.")


def resolve_sampling_dtype(dtype: torch.dtype, device: Union[str, torch.device]) -> torch.dtype:
    """The dtype a step on ``device`` draws and computes probabilities in: ``dtype``, except float64 on a device type
    of :data:`NO_FLOAT64_DEVICE_TYPES` (Apple's MPS), which gives float32."""
    if dtype == torch.float64 and torch.device(device).type in NO_FLOAT64_DEVICE_TYPES:
        return torch.float32
    return dtype


#: Largest (rows, vocab) temporary a chunked step builds at once (:meth:`LogitRows.chunks`; a scheduler's
#: ``chunk_bytes``).
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


#: Column group width of :func:`grouped_max_and_argmax` (it reduces groups with ``amax``, then searches one group).
ARGMAX_GROUP = 128


def grouped_max_and_argmax(x: torch.Tensor, skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, first index of the max)`` of each (K, V) row of ``x`` over every column but ``skip``: ``x.max(-1)``.

    ``torch.max(dim)`` / ``torch.argmax`` on CPU run several times slower than ``amax`` over the same rows (they
    dominated a greedy step at a 32k vocabulary), so the columns are cut into groups of :data:`ARGMAX_GROUP`: one
    ``amax`` gives the group maxima (the group holding ``skip`` is reduced again without it), their max is the row's,
    and only the first group holding it is searched. Ties resolve to the first index, as ``argmax`` does; NaN
    propagates into the max (not from the ``skip`` column; the index of such a row is unspecified). ``x`` is not
    copied.
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


def plain_max_and_argmax(x: torch.Tensor, skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grouped_max_and_argmax` by ``torch.max(dim)`` over the columns left and right of ``skip`` (no copy of
    ``x``): the same values, and the same indices on every row whose max is not NaN (ties to the first index;
    ``-inf`` and index 0 for a row with no column but ``skip``)."""
    rows, width = x.shape
    if skip is None:
        value, index = x.max(-1)
        return value, index
    if width == 1:
        return x.new_full((rows,), -math.inf), torch.zeros(rows, dtype=torch.long, device=x.device)
    if skip == 0:
        value, index = x[:, 1:].max(-1)
        return value, index + 1
    left_value, left_index = x[:, :skip].max(-1)
    if skip == width - 1:
        return left_value, left_index
    right_value, right_index = x[:, skip + 1 :].max(-1)
    # the left maximum wins ties and NaN; a NaN on the right makes ``left >= right`` False, so it propagates too
    left = (left_value >= right_value) | left_value.isnan()
    return torch.where(left, left_value, right_value), torch.where(left, left_index, right_index + skip + 1)


def max_and_argmax(x: torch.Tensor, skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, first index of the max)`` of each (K, V) row of ``x`` over every column but ``skip``: the grouped
    reduction (:func:`grouped_max_and_argmax`) on a device type of :data:`GROUPED_ARGMAX_DEVICE_TYPES`, where it is
    faster, and :func:`plain_max_and_argmax` elsewhere (both give the same result)."""
    if x.device.type in GROUPED_ARGMAX_DEVICE_TYPES:
        return grouped_max_and_argmax(x, skip)
    return plain_max_and_argmax(x, skip)


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


class LogitRows:
    """The (K, vocab) logit rows a step reads, at the True entries of a (batch, length) bool ``positions`` (row-major),
    gathered chunk by chunk.

    ``model_output`` is full (batch, length, vocab) logits or the already-packed (K, vocab) rows at ``positions`` (what
    a model called with ``logits_to_keep=positions`` returns); both are checked here (``ValueError`` naming
    ``model_output``). ``counts`` (rows per batch row, when the caller has them) saves a host sync.
    """

    def __init__(
        self,
        model_output: torch.Tensor,
        positions: torch.Tensor,
        vocab_size: Optional[int],
        counts: Optional[Sequence[int]] = None,
    ) -> None:
        _check_output(model_output, positions, vocab_size, counts)
        self.model_output = model_output
        self.positions = positions
        self._counts = None if counts is None else list(counts)
        # index: None (every packed row, in order), a (K,) index into the packed rows, or (batch, length) indices
        self.index: Optional[Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = None
        if model_output.dim() == 3:
            self.index = positions.nonzero(as_tuple=True)
            self.count = self.index[0].numel()
        else:
            self.count = model_output.shape[0]

    @property
    def device(self) -> torch.device:
        """The device of the logits."""
        return self.model_output.device

    def counts(self) -> list[int]:
        """Rows per batch row (python ints; one host sync unless given)."""
        if self._counts is None:
            self._counts = row_counts(self.positions)
        return self._counts

    def select(self, rows: torch.Tensor, positions: torch.Tensor, counts: Optional[Sequence[int]] = None) -> LogitRows:
        """The rows where the (K,) bool ``rows`` is True (in order): those at the (batch, length) ``positions``
        (``positions`` = the True entries of ``self.positions`` that ``rows`` keeps; ``counts``, their number per batch
        row, when the caller has them)."""
        subset = LogitRows.__new__(LogitRows)
        subset.model_output = self.model_output
        subset.positions = positions
        subset._counts = None if counts is None else list(counts)
        if isinstance(self.index, tuple):
            subset.index = (self.index[0][rows], self.index[1][rows])
            subset.count = subset.index[0].numel()
        else:
            picked = rows.nonzero().squeeze(1)
            subset.index = picked if self.index is None else self.index[picked]
            subset.count = subset.index.numel()
        return subset

    def all(self) -> torch.Tensor:
        """Every row at once (a view of packed logits; a gathered copy of full ones)."""
        return self._gather(0, self.count)

    def _gather(self, start: int, stop: int) -> torch.Tensor:
        if self.index is None:
            return self.model_output[start:stop]
        if isinstance(self.index, tuple):
            return self.model_output[self.index[0][start:stop], self.index[1][start:stop]]
        return self.model_output[self.index[start:stop]]

    def chunks(self, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, rows[start:stop])`` over consecutive row chunks whose (rows, vocab) temporaries in ``dtype``
        stay within ``chunk_bytes`` each (at least one row per chunk); a row-wise computation over the chunks gives
        the unchunked result exactly."""
        width = self.model_output.shape[-1] * torch.finfo(dtype).bits // 8
        step = max(1, chunk_bytes // max(width, 1))
        for start in range(0, self.count, step):
            stop = min(start + step, self.count)
            yield start, stop, self._gather(start, stop)


def sample_rows(
    rows: LogitRows,
    generator: GeneratorLike,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    forbidden_token_id: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """One draw ``x ~ softmax(filter(logits / temperature))`` per row of ``rows`` (:func:`process_logits`, then the
    exact :func:`inverse_cdf` draw), in chunks of rows.

    One uniform number per row is drawn up front in row-major order (with a list of generators, the rows of batch row
    ``b`` read ``generator[b]``); every operation is row-wise, so the draws equal the unchunked composition's, while
    the (rows, vocab) temporaries in ``dtype`` never exceed ``chunk_bytes`` each.
    """
    counts = rows.counts() if per_row(generator) else [rows.count]
    u = draw_rows(counts, generator, rows.device, dtype)[:, 0]
    out = torch.empty(rows.count, dtype=torch.long, device=rows.device)
    for start, stop, chunk in rows.chunks(dtype, chunk_bytes):
        log_probs = process_logits(chunk, temperature, top_k, top_p, forbidden_token_id, dtype)
        out[start:stop] = inverse_cdf(log_probs, u[start:stop])
    return out
