"""The block-diffusion training objective (BD3-LM's vectorized form, as SDAR and Fast-dLLM v2 train).

A model with ``config.block_size = K`` attends bidirectionally inside a block of ``K`` positions and causally across
blocks (blocks counted from position 0 of each row). Trained on ``x_t`` alone, a noisy block would read noisy earlier
blocks, while at sampling time the earlier blocks are finished and clean. The objective therefore feeds, in ONE
forward per batch, the ``2L`` tokens ``[x_t | x_1]`` (both halves with the position ids ``pos = cumsum(mask) - 1`` of
the padding mask) under the mask of :func:`dfm_hf.models.masking.block_diffusion_training_mask`: a noisy query of
block ``b`` sees the noisy keys of block ``b`` and the clean keys of the blocks before it; a clean query sees the clean
keys of blocks ``<= b``. The logits of the noisy half equal those of a loop over blocks of forwards on
``[clean blocks < b, noisy block b]``; the loss is the chosen loss (:func:`~.losses.batch_loss`) at the noisy half's
scored positions, ``-log p(x_1^i | x_1^{blocks < b(i)}, x_t^{block b(i)})`` for ``--loss ce``.

With ``config.logits_shift`` (a converted causal LM) token ``i`` is predicted from the hidden state at position
``i - 1`` that query ``i`` attends to: the clean half's for the first position of a block (at sampling time the
previous block is finished and clean), the noisy half's inside a block. The model resolves that from the 4-D mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from ..models.losses import IGNORE_INDEX
from ..models.masking import block_diffusion_training_mask, padding_positions

__all__ = ["block_diffusion_inputs", "block_diffusion_logits", "scored_logits"]


def block_diffusion_inputs(
    noisy_ids: torch.Tensor, clean_ids: torch.Tensor, attention_mask: torch.Tensor, block_size: int
) -> dict[str, torch.Tensor]:
    """The model inputs of the vectorized objective for ``x_t = noisy_ids`` and ``x_1 = clean_ids`` ``(batch, L)``
    with padding mask ``attention_mask`` (1 = real).

    Returns ``input_ids`` ``(batch, 2L)`` = ``[x_t | x_1]``, ``position_ids`` ``(batch, 2L)`` = ``[pos | pos]``
    (``pos = cumsum(mask) - 1``: a left-padded row has the blocks of the same row alone) and ``attention_mask``, the
    4-D bool ``(batch, 1, 2L, 2L)`` of :func:`~dfm_hf.models.masking.block_diffusion_training_mask` (True = attend).
    """
    if noisy_ids.dim() != 2 or noisy_ids.shape != clean_ids.shape or noisy_ids.shape != attention_mask.shape:
        raise ValueError(
            "`noisy_ids`, `clean_ids` and `attention_mask` must share one (batch, L) shape, got "
            f"{tuple(noisy_ids.shape)}, {tuple(clean_ids.shape)} and {tuple(attention_mask.shape)}."
        )
    pos = padding_positions(attention_mask, attention_mask.shape[1])
    return {
        "input_ids": torch.cat([noisy_ids, clean_ids], dim=1),
        "position_ids": torch.cat([pos, pos], dim=1),
        "attention_mask": block_diffusion_training_mask(pos, block_size, attention_mask),
    }


def block_diffusion_logits(model: Any, batch: Mapping[str, torch.Tensor], block_size: int) -> torch.Tensor:
    """``(K, vocab)`` logits of the ``K`` scored positions of a collated batch (``labels != -100``, row-major): one
    forward of ``model`` (a ``DFMForMaskedGeneration`` with ``config.block_size = block_size``, possibly wrapped by
    DDP / PEFT) on :func:`block_diffusion_inputs` of ``batch["input_ids"]`` (``x_t``) and ``batch["clean_ids"]``
    (``x_1``: collate with ``return_clean_ids=True``), the LM head run at the noisy half's scored positions only."""
    if "clean_ids" not in batch:
        raise ValueError("block diffusion needs the clean rows: collate with `return_clean_ids=True`.")
    inputs = block_diffusion_inputs(batch["input_ids"], batch["clean_ids"], batch["attention_mask"], block_size)
    scored = batch["labels"] != IGNORE_INDEX
    keep = torch.cat([scored, torch.zeros_like(scored)], dim=1)
    return model(**inputs, timesteps=batch["timesteps"], logits_to_keep=keep).logits


def scored_logits(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    attention_mask: Optional[torch.Tensor] = None,
    unwrapped: Optional[Any] = None,
) -> torch.Tensor:
    """``(K, vocab)`` logits of a collated batch's scored positions (row-major), the input of
    :func:`~.losses.batch_loss`: the block-diffusion objective (:func:`block_diffusion_logits`) for a model with
    ``config.block_size``, else one forward on ``x_t`` under ``attention_mask`` (default: the batch's padding mask;
    the attention annealing passes its 4-D mask).

    ``model`` is what is called (possibly wrapped: DDP, PEFT); ``unwrapped`` (default ``model``) is where the config
    is read.
    """
    config = (model if unwrapped is None else unwrapped).config
    block_size = getattr(config, "block_size", None)
    if block_size is not None:
        return block_diffusion_logits(model, batch, block_size)
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"] if attention_mask is None else attention_mask,
        timesteps=batch["timesteps"],
        logits_to_keep=batch["labels"] != IGNORE_INDEX,
    ).logits
