"""The attention mask of a DFM forward, built once per forward for the selected attention implementation.

One rule says which key each query may attend to: the padding mask (2-D) or the caller's 4-D mask, and on top of it a
pattern over absolute positions (none: bidirectional; ``block_size=K``: block-causal, query ``i`` sees key ``j``
when ``j // K <= i // K``). The rule is then written in the form the attention function reads: an additive float
mask (eager, SDPA and registered custom functions), a ``BlockMask`` (flex attention) or the 2-D padding mask (flash
attention).

Only ``torch`` is imported: this file is copied next to the weights with the modeling file.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _caller_mask(
    attention_mask: Any, batch: int, q_len: int, k_len: int, num_heads: int, dtype: torch.dtype, device: torch.device
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(allowed, additive)``: the caller's mask as a broadcastable bool ``(batch|1, 1|heads, q_len|1, k_len)``
    (True = attend) or, for a 4-D float mask, as an additive mask in ``dtype``; ``(None, None)`` without one."""
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        raise ValueError(
            f"`attention_mask` must be a (batch, len) = {(batch, k_len)} padding mask or a 4-D additive float mask "
            f"(batch, 1, {q_len}, {k_len}), got {_shape(attention_mask)} (`attention_mask` is the second positional "
            "argument; pass `timesteps=` by keyword)."
        )
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, k_len):
            what = "the shape of `input_ids`" if q_len == k_len else "shape (batch, cache length)"
            raise ValueError(f"`attention_mask` must have {what} {(batch, k_len)}, got {tuple(attention_mask.shape)}.")
        return (attention_mask.to(device=device) != 0)[:, None, None, :], None
    shape = tuple(attention_mask.shape)
    if shape[0] not in (1, batch) or shape[1] not in (1, num_heads) or shape[2] != q_len or shape[3] != k_len:
        raise ValueError(
            f"A 4-D `attention_mask` must have shape (batch, 1, q_len, k_len) = {(batch, 1, q_len, k_len)} "
            f"(batch and heads may also be 1 / num_attention_heads), got {shape}."
        )
    mask = attention_mask.to(device=device)
    if mask.dtype == torch.bool:
        return mask, None
    if not mask.dtype.is_floating_point:
        raise ValueError(
            "A 4-D `attention_mask` must be additive floats (0 = attend, finfo(dtype).min = blocked) or bool "
            f"(True = attend), got dtype {mask.dtype}."
        )
    if mask.dtype != dtype:
        mask = mask.clamp(min=torch.finfo(dtype).min).to(dtype)
    return None, mask


def block_causal_pattern(query_positions: torch.Tensor, key_positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(batch|1, 1, q, k)`` bool: query at position ``i`` attends to the key at ``j`` when ``j // K <= i // K``
    (``K = block_size``; blocks counted from position 0). Positions are ``(batch|1, q)`` and ``(batch|1, k)``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be None or an integer >= 1, got {block_size!r}.")
    return (key_positions[:, None, None, :] // block_size) <= (query_positions[:, None, :, None] // block_size)


def _block_mask(allowed: torch.Tensor, batch: int, q_len: int, k_len: int, device: torch.device) -> Any:
    """The flex-attention ``BlockMask`` of the bool rule ``allowed`` ``(batch|1, 1|heads, q|1, k)``."""
    from torch.nn.attention.flex_attention import create_block_mask

    heads = allowed.shape[1]
    dense = allowed.expand(batch, heads, q_len, k_len)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return dense[b, h if heads > 1 else 0, q_idx, kv_idx]

    return create_block_mask(
        mask_mod, B=batch, H=heads if heads > 1 else None, Q_LEN=q_len, KV_LEN=k_len, device=device
    )


def create_attention_mask(
    attention_mask: Any,
    *,
    attn_implementation: Optional[str],
    batch: int,
    query_length: int,
    key_length: int,
    num_heads: int,
    dtype: torch.dtype,
    device: torch.device,
    query_positions: Optional[torch.Tensor] = None,
    key_positions: Optional[torch.Tensor] = None,
    block_size: Optional[int] = None,
) -> Optional[Union[torch.Tensor, Any]]:
    """The mask handed to every layer's attention function, or None (every query attends to every key).

    Args:
        attention_mask: the caller's mask: ``(batch, key_length)`` 1 = real token, 0 = padding; or a 4-D mask
            ``(batch|1, 1|num_heads, query_length, key_length)``, bool (True = attend) or additive float
            (0 = attend, ``finfo(dtype).min`` = blocked).
        attn_implementation: ``config._attn_implementation``: ``"flex_attention"`` gets a ``BlockMask`` (so it
            refuses an additive float 4-D mask), a flash implementation the 2-D padding mask (nothing else is
            expressible there), anything else an additive float mask ``(batch|1, 1|heads, query_length|1,
            key_length)`` in ``dtype``.
        query_positions, key_positions: ``(batch|1, n)`` absolute positions of the queries and keys (the pattern
            reads them; default ``0..n-1``).
        block_size: ``None`` (bidirectional) or ``K`` (block-causal, see :func:`block_causal_pattern`).
    """
    allowed, additive = _caller_mask(attention_mask, batch, query_length, key_length, num_heads, dtype, device)
    if block_size is not None:
        if query_positions is None:
            query_positions = torch.arange(query_length, device=device)[None]
        if key_positions is None:
            key_positions = torch.arange(key_length, device=device)[None]
        pattern = block_causal_pattern(query_positions.to(device), key_positions.to(device), block_size)
        allowed = pattern if allowed is None else allowed & pattern
    implementation = attn_implementation or "sdpa"
    if "flash" in implementation:  # flash_attention_2 / _3 and the hub kernels of flash attention
        if additive is not None or block_size is not None or attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError(
                f"attn_implementation={implementation!r} reads only a 2-D padding `attention_mask`; use 'sdpa', "
                "'eager' or 'flex_attention' for a 4-D mask or an attention pattern."
            )
        if attention_mask is not None and query_length != key_length:
            raise ValueError(
                f"attn_implementation={implementation!r} cannot combine a padding `attention_mask` with a cached "
                "partial forward; use 'sdpa', 'eager' or 'flex_attention'."
            )
        return attention_mask
    if implementation == "flex_attention":
        if additive is not None:
            raise ValueError(
                "attn_implementation='flex_attention' reads the mask as a BlockMask (attend or not): pass a 4-D bool "
                "`attention_mask` (True = attend), or use 'sdpa' / 'eager' for an additive float one."
            )
        return None if allowed is None else _block_mask(allowed, batch, query_length, key_length, device)
    minimum = torch.finfo(dtype).min
    bias = (
        None
        if allowed is None
        else torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, minimum)
    )
    if additive is not None:
        bias = additive if bias is None else (bias + additive).clamp(min=minimum)
    return bias


__all__ = ["block_causal_pattern", "create_attention_mask"]
