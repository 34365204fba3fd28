"""Shared sampling utilities of the schedulers: per-row random draws and categorical draws from logit rows.

Randomness is drawn per batch row when a list of generators is given (the diffusers convention), so a row's sample
depends only on its own generator and never on what else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

GeneratorLike = Optional[Union[torch.Generator, Sequence[torch.Generator]]]

SAMPLING_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def check_generator(generator: GeneratorLike, batch_size: int) -> None:
    """Raise ``ValueError`` unless ``generator`` is None, a ``torch.Generator`` or one generator per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(
                f"`generator` must be a torch.Generator or a list of {batch_size} torch.Generator (one per row), "
                f"got a list of {len(generator)}."
            )
        return
    raise ValueError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}.")


def rand_at(
    positions: torch.Tensor, generator: GeneratorLike, dtype: torch.dtype = torch.float64, columns: int = 1
) -> torch.Tensor:
    """Uniform draws in ``[0, 1)`` at the True entries of the (batch, length) bool tensor ``positions``.

    Returns a (batch, length, columns) tensor (zeros elsewhere). With a list of generators, row ``b`` consumes
    exactly ``positions[b].sum() * columns`` numbers from ``generator[b]``, so padding and other rows do not shift it.
    """
    if not isinstance(generator, (list, tuple)):
        return torch.rand(
            (*positions.shape, columns), generator=generator, device=positions.device, dtype=dtype
        ).masked_fill_(~positions.unsqueeze(-1), 0.0)
    out = torch.zeros((*positions.shape, columns), device=positions.device, dtype=dtype)
    for b, g in enumerate(generator):
        idx = positions[b].nonzero().squeeze(-1)
        out[b, idx] = torch.rand((idx.numel(), columns), generator=g, device=positions.device, dtype=dtype)
    return out


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
    rows = rows.to(dtype)
    if rows.numel() == 0:
        return rows
    if bool(torch.isnan(rows).any() | torch.isposinf(rows).any()):
        raise ValueError("`model_output` contains NaN or +inf logits at positions the step reads.")
    if forbidden_token_id is not None:
        rows[:, forbidden_token_id] = -math.inf
    if temperature == 0:
        greedy = torch.full_like(rows, -math.inf)
        greedy.scatter_(1, rows.argmax(-1, keepdim=True), 0.0)
        rows = greedy
    elif temperature != 1.0:
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


def draw_categorical(
    log_probs: torch.Tensor, counts: Optional[Sequence[int]], generator: GeneratorLike
) -> torch.Tensor:
    """One draw per row of (K, vocab) ``log_probs``; rows are grouped by batch row as ``counts`` says.

    With a list of generators, the rows of batch row ``b`` (``counts[b]`` of them, in order) use ``generator[b]``.
    """
    if log_probs.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=log_probs.device)
    probs = log_probs.exp()
    if not isinstance(generator, (list, tuple)):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    start = 0
    for g, n in zip(generator, counts):
        if n:
            out[start : start + n] = torch.multinomial(probs[start : start + n], 1, generator=g).squeeze(-1)
        start += n
    return out


def rows_of(model_output: torch.Tensor, positions: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """The logit rows at the True entries of ``positions`` (row-major), from full or already-packed logits.

    ``model_output`` is either (batch, length, vocab) logits or the (K, vocab) rows at ``positions`` that a model
    called with ``logits_to_keep=positions`` returns.
    """
    if model_output.dim() == 3:
        if model_output.shape[:2] != positions.shape:
            raise ValueError(
                f"`model_output` of shape {tuple(model_output.shape)} does not match `sample` of shape "
                f"{tuple(positions.shape)}: expected (batch, length, vocab)."
            )
        rows = model_output[positions]
    elif model_output.dim() == 2:
        count = int(positions.sum())
        if model_output.shape[0] != count:
            raise ValueError(
                f"packed `model_output` has {model_output.shape[0]} rows but the step reads {count} positions; "
                "pass full (batch, length, vocab) logits or the rows at `plan_step(...)` positions."
            )
        rows = model_output
    else:
        raise ValueError(
            f"`model_output` must be (batch, length, vocab) logits, got shape {tuple(model_output.shape)}."
        )
    if vocab_size is not None and rows.shape[-1] != vocab_size:
        raise ValueError(f"`model_output` has {rows.shape[-1]} logits per position but `vocab_size` is {vocab_size}.")
    return rows
