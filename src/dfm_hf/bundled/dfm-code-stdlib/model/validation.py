"""Input checks of the DFM forward: clear ``ValueError`` messages naming the argument, no host synchronisation
(except :func:`check_shift_sources`, run only by a shifted forward that looks positions up and keeps some logits).

Only ``torch`` is imported: this file is copied next to the weights with the modeling file.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _is_integer_tensor(x: Any) -> bool:
    return (
        isinstance(x, torch.Tensor) and not x.dtype.is_floating_point and not x.is_complex() and x.dtype != torch.bool
    )


def check_inputs(input_ids: Any, inputs_embeds: Any, hidden_size: int, max_length: int) -> tuple[int, int]:
    """``(batch, len)`` of exactly one of ``input_ids`` (integer ``(batch, len)``) and ``inputs_embeds`` (float
    ``(batch, len, hidden_size)``), ``1 <= len <= max_length``. Token ids are not range-checked (a device sync)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
    if input_ids is not None:
        name = "input_ids"
        if not _is_integer_tensor(input_ids):
            raise ValueError(f"`input_ids` must be an integer tensor of shape (batch, len), got {type(input_ids)}.")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"`input_ids` must have shape (batch, len) with len >= 1, got {tuple(input_ids.shape)}.")
        batch, length = input_ids.shape
    else:
        name = "inputs_embeds"
        if (
            not isinstance(inputs_embeds, torch.Tensor)
            or not inputs_embeds.dtype.is_floating_point
            or inputs_embeds.dim() != 3
            or inputs_embeds.shape[1] == 0
            or inputs_embeds.shape[2] != hidden_size
        ):
            raise ValueError(
                f"`inputs_embeds` must be a float tensor of shape (batch, len, hidden_size={hidden_size}) with "
                f"len >= 1, got {_shape(inputs_embeds)}."
            )
        batch, length = inputs_embeds.shape[:2]
    if length > max_length:
        raise ValueError(f"`{name}` has length {length} > max_position_embeddings ({max_length}).")
    return batch, length


def prepare_timesteps(
    timesteps: Optional[Union[float, torch.Tensor]], batch: int, device: torch.device
) -> Optional[torch.Tensor]:
    """``timesteps`` as float32 ``(batch,)`` (a scalar or a 1-element tensor is broadcast), or None."""
    if timesteps is None:
        return None
    expected = f"a float, a 0-d tensor or a tensor of shape ({batch},)"
    if isinstance(timesteps, (str, bytes, bool)):
        raise ValueError(f"`timesteps` must be {expected}, got {timesteps!r}.")
    try:
        t = torch.as_tensor(timesteps, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`timesteps` must be {expected}, got {type(timesteps).__name__}.") from err
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"`timesteps` must be real numbers, got dtype {t.dtype}.")
    t = t.to(torch.float32)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
        return t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"`timesteps` must be {expected} (one time per row), got shape {tuple(t.shape)}.")
    return t


def prepare_position_ids(position_ids: Any, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """``position_ids`` ``(batch, len)`` or ``(len,)`` as a long ``(batch, len)`` tensor (values not checked)."""
    if not _is_integer_tensor(position_ids) or position_ids.dim() not in (1, 2):
        raise ValueError(
            f"`position_ids` must be an integer tensor of shape (batch, len) = {(batch, seq_len)} (or (len,)), "
            f"got {_shape(position_ids)}."
        )
    pos = position_ids.to(device=device, dtype=torch.long)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.shape[1] != seq_len or pos.shape[0] not in (1, batch):
        raise ValueError(
            f"`position_ids` must have shape (batch, len) = {(batch, seq_len)} (or (len,)), got {_shape(position_ids)}."
        )
    return pos.expand(batch, seq_len)


def prepare_logits_to_keep(
    logits_to_keep: Any, batch: int, seq_len: int, device: torch.device
) -> Optional[Union[torch.Tensor, slice]]:
    """The selection along ``(batch, len)``: None (all), a bool mask, a long index tensor or a slice (int N)."""
    if logits_to_keep is None:
        return None
    if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
        if logits_to_keep < 0:
            raise ValueError(f"An int `logits_to_keep` must be >= 0 (0 = all positions), got {logits_to_keep}.")
        return None if logits_to_keep == 0 else slice(-logits_to_keep, None)
    if not isinstance(logits_to_keep, torch.Tensor):
        raise ValueError(
            "`logits_to_keep` must be None, an int N >= 0 (the last N positions; 0 = all), a bool tensor of shape "
            f"(batch, len) or a 1-D long tensor of positions, got {type(logits_to_keep).__name__}."
        )
    keep = logits_to_keep.to(device)
    if keep.dtype == torch.bool:
        if keep.shape != (batch, seq_len):
            raise ValueError(
                f"A boolean `logits_to_keep` must have shape (batch, len) = {(batch, seq_len)}, "
                f"got {tuple(keep.shape)}."
            )
        return keep
    if keep.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"`logits_to_keep` must be a bool or long tensor, got dtype {keep.dtype}.")
    if keep.dim() != 1:
        raise ValueError(f"An index `logits_to_keep` must be 1-D (positions), got shape {tuple(keep.shape)}.")
    return keep.long()


def prepare_block_size(block_size: Any, config_block_size: Optional[int]) -> Optional[int]:
    """The block length of a forward's block-causal pattern: ``config_block_size`` when ``block_size`` is None, else
    ``block_size``, a positive multiple of the model's (a block model may decode with larger blocks than it was
    trained with, as SDAR does). A full-attention model (``config_block_size`` None) takes none."""
    if block_size is None:
        return config_block_size
    if config_block_size is None:
        raise ValueError(
            f"`block_size`={block_size!r} applies to a block-diffusion model (`config.block_size` set); this model "
            "attends bidirectionally."
        )
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 1
        or block_size % config_block_size
    ):
        raise ValueError(
            f"`block_size` must be None or a positive multiple of the model's block_size={config_block_size}, got "
            f"{block_size!r}."
        )
    return block_size


def check_shift_sources(
    found: torch.Tensor, keep: Union[torch.Tensor, slice], position_ids: torch.Tensor, block: bool
) -> None:
    """Raise ``ValueError`` when a position whose logits ``keep`` asks for has no source under ``logits_shift``.

    ``found`` ``(batch, len)``: the slice holds (for a block model: among the entries the query attends to) an entry
    at position ``p - 1`` for the query at ``p`` (``p = 0`` reads itself). Its hidden state is computed only by this
    forward (a cache holds keys and values, not hidden states), so a kept query without it has no exact logits.
    ``keep`` is the selection of :func:`prepare_logits_to_keep` (a bool mask, a long index or a slice). One host
    synchronisation.
    """
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
        kept = keep
    else:
        kept = torch.zeros_like(found)
        kept[:, keep] = True
    missing = kept & ~found
    if not bool(missing.any()):
        return
    row, column = (int(i) for i in missing.nonzero()[0])
    p = int(position_ids[row, column])
    where = "that the query attends to" if block else "of this forward"
    raise ValueError(
        f"`logits_to_keep` asks for the logits of position {p} (row {row}), which a `logits_shift` model reads from "
        f"the hidden state at position {p - 1}; no entry of `position_ids` {where} is at {p - 1} (a cached partial "
        f"forward computes hidden states only for its slice): add position {p - 1} to the slice or do not keep "
        f"position {p}."
    )


def check_no_kwargs(kwargs: dict[str, Any], method: str) -> None:
    """Raise ``TypeError`` naming the keyword arguments ``method`` does not take (nothing is silently ignored)."""
    if kwargs:
        raise TypeError(f"{method} got unexpected keyword arguments: {sorted(kwargs)}.")


def check_labels(labels: Any, batch: int, seq_len: int) -> None:
    """Raise unless ``labels`` is a tensor of shape ``(batch, len)``."""
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (batch, seq_len):
        raise ValueError(f"`labels` must have the shape of `input_ids` {(batch, seq_len)}, got {_shape(labels)}.")


__all__ = [
    "check_inputs",
    "check_labels",
    "check_no_kwargs",
    "check_shift_sources",
    "prepare_block_size",
    "prepare_logits_to_keep",
    "prepare_position_ids",
    "prepare_timesteps",
]
