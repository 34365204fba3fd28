"""What a sampling loop reads of its caller: :class:`SamplingCall` (the model and the call's fixed settings) and
:class:`SamplingResult` (what a loop returns).

The loops (:mod:`~dfm_hf.generation.full_attention`, :mod:`~dfm_hf.generation.block_diffusion`) are shared by
:class:`~dfm_hf.DFMPipeline` and ``DFMForMaskedGeneration.generate``: each caller describes itself with a
:class:`SamplingCall` (a pipeline passes its progress bar and itself as the callback's owner; ``generate()`` passes
neither), so both run the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


def _no_progress_bar(iterable: Iterable) -> Iterable:
    return iterable


def _ignore(_: int) -> None:
    return None


@dataclass
class SamplingCall:
    """The caller of a sampling loop.

    Args:
        model: the denoiser (a ``DFMForMaskedGeneration`` or a model with the same call signature).
        mask_token_id: the mask id.
        pad_token_id: the id written at padding columns.
        device: where the rows live during the loop.
        eos_token_ids: the ids a block-diffusion row stops after (a 1-D LongTensor), or None.
        progress_bar: wraps the iterable of steps (or blocks) of the loop.
        callback_owner: the first argument of a step-end callback (the pipeline).
        set_num_timesteps: told the number of steps the call runs, before its first step (diffusers' callbacks read
            ``pipe.num_timesteps``).
    """

    model: torch.nn.Module
    mask_token_id: int
    pad_token_id: int
    device: torch.device
    eos_token_ids: Optional[torch.Tensor] = None
    progress_bar: Callable[[Iterable], Iterable] = field(default=_no_progress_bar)
    callback_owner: Any = None
    set_num_timesteps: Callable[[int], None] = field(default=_ignore)


@dataclass
class SamplingResult:
    """What a sampling loop returns (host tensors): the final rows, the positions to return (prompt and generated
    positions, or only the latter), the generated positions, and ``nfe`` (the model forward passes run)."""

    sample: torch.Tensor
    keep: torch.Tensor
    generated: torch.Tensor
    nfe: int


def eos_token_ids(tokenizer: Any, config: Any) -> Optional[torch.Tensor]:
    """The EOS ids a row stops at: the tokenizer's, else the model config's (an id or a list); None without one."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return None
    return torch.tensor(list(eos) if isinstance(eos, (list, tuple)) else [eos], dtype=torch.long)


__all__ = ["SamplingCall", "SamplingResult", "eos_token_ids"]
