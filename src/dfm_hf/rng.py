"""Random draws with ``torch.Generator`` objects, the one place every draw of the library goes through.

Two rules, both those of diffusers (``diffusers.utils.torch_utils.randn_tensor``):

* **Device.** A draw is made on the generator's own device and then moved to where it is used, so a CPU generator
  drives a GPU run (torch itself refuses a CPU generator for a CUDA draw) and gives the same numbers on every device.
* **Rows.** ``generator`` is ``None``, one ``torch.Generator``, or a list with one generator per batch row. Draws
  "at positions" take one number per selected position in row-major order. A list makes row ``b`` read only
  ``generator[b]``, so a row's sample never depends on the rest of the batch; a single generator is read by the
  rows in turn, which on one row is exactly what ``[generator]`` does (a one-element list and its generator are the
  same thing, as in diffusers).

This module is pure tensor code with no Hugging Face imports (``paths.py`` and the schedulers both use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

GeneratorLike = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def check_generator(generator: GeneratorLike, batch_size: int) -> None:
    """Raise ``ValueError`` unless ``generator`` is None, a ``torch.Generator`` or a list of one per row."""
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


def per_row(generator: GeneratorLike) -> bool:
    """Whether ``generator`` is a list of generators, one per row (a one-element list counts as per row)."""
    return isinstance(generator, (list, tuple))


def _draw_device(generator: Optional[torch.Generator], device: Union[str, torch.device, None]) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device("cpu") if device is None else torch.device(device)


def rand(
    shape: Sequence[int],
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``U[0, 1)`` numbers of ``shape`` drawn on ``generator``'s device, returned on ``device``."""
    out = torch.rand(tuple(shape), generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return out if device is None else out.to(device)


def randint(
    high: int,
    shape: Sequence[int],
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Uniform integers in ``[0, high)`` of ``shape`` drawn on ``generator``'s device, returned on ``device``."""
    out = torch.randint(0, high, tuple(shape), generator=generator, device=_draw_device(generator, device))
    return out if device is None else out.to(device)


def row_counts(positions: torch.Tensor) -> list[int]:
    """Number of True entries of each row of a (batch, length) bool tensor, as python ints (one host sync)."""
    return positions.sum(1).tolist()


def draw_rows(
    counts: Sequence[int],
    generator: GeneratorLike,
    device: Union[str, torch.device],
    dtype: torch.dtype = torch.float64,
    columns: int = 1,
) -> torch.Tensor:
    """``(sum(counts), columns)`` uniform numbers, the ``counts[b]`` rows of batch row ``b`` first for ``b = 0``.

    With a list of generators, row ``b``'s numbers come from ``generator[b]`` alone; with one generator (or None)
    they are one draw in that order, which equals drawing row after row from it.
    """
    total = int(sum(counts))
    if not per_row(generator):
        return rand((total, columns), generator, device, dtype)
    parts = [rand((n, columns), g, device, dtype) for g, n in zip(generator, counts) if n]
    if not parts:
        return torch.empty((0, columns), dtype=dtype, device=device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def rand_at(
    positions: torch.Tensor,
    generator: GeneratorLike,
    dtype: torch.dtype = torch.float64,
    columns: int = 1,
    counts: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Uniform draws in ``[0, 1)`` at the True entries of the (batch, length) bool tensor ``positions``.

    Returns a (batch, length, columns) tensor (zeros elsewhere). Row ``b`` consumes exactly
    ``positions[b].sum() * columns`` numbers (from ``generator[b]`` with a list), so padding and other rows never
    shift it. ``counts`` (the per-row counts, if the caller has them) saves a host sync.
    """
    counts = row_counts(positions) if counts is None else counts
    out = torch.zeros((*positions.shape, columns), device=positions.device, dtype=dtype)
    out[positions] = draw_rows(counts, generator, positions.device, dtype, columns)
    return out


def uniform_tokens_at(
    counts: Sequence[int],
    vocab_size: int,
    excluded_token_id: Optional[int],
    generator: GeneratorLike,
    device: Union[str, torch.device],
) -> torch.Tensor:
    """``sum(counts)`` i.i.d. uniform token ids in ``[0, vocab_size)`` never equal to ``excluded_token_id``, grouped
    by batch row as :func:`draw_rows` groups its numbers."""
    high = vocab_size - (excluded_token_id is not None)
    if not per_row(generator):
        ids = randint(high, (int(sum(counts)),), generator, device)
    else:
        parts = [randint(high, (n,), g, device) for g, n in zip(generator, counts)]
        ids = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)
    if excluded_token_id is not None:
        ids = ids + (ids >= excluded_token_id).to(ids.dtype)
    return ids


__all__ = [
    "GeneratorLike",
    "check_generator",
    "draw_rows",
    "per_row",
    "rand",
    "rand_at",
    "randint",
    "row_counts",
    "uniform_tokens_at",
]
