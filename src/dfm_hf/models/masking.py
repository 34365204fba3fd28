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
            what = "the shape of `input_ids`" if q_len == k_len else "shape (batch, key length)"
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


def padding_positions(attention_mask: Any, length: int) -> Optional[torch.Tensor]:
    """``(batch, length)`` positions of the tokens of a 2-D padding mask: ``cumsum(mask) - 1``, so a left-padded row
    has the positions of the same row alone (padding on the left takes position 0, padding on the right the last
    real position; both are masked as keys). None unless ``attention_mask`` is a 2-D tensor with ``length`` columns
    (the mask builder reports a wrong shape)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[1] != length:
        return None
    return ((attention_mask != 0).long().cumsum(dim=1) - 1).clamp_min(0)


def pattern_positions(
    attention_mask: Any,
    position_ids: Optional[torch.Tensor],
    key_length: int,
    cached: bool,
    block_size: Optional[int],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(query_positions, key_positions)`` of a forward (None: ``0..n-1``), for the pattern and the rotary embedding.

    Without a cache the keys are the queries: both are ``position_ids``. A block model (``block_size`` set) places
    its blocks on the row's positions (:func:`padding_positions` of a 2-D ``attention_mask``, so padding does not
    count): they are its queries' default, and its keys' positions with a ``cached`` (appended) forward. A full-
    attention model's cached forward reads no key position (it has no pattern).
    """
    key_positions = None if cached else position_ids
    if block_size is not None:
        row_positions = padding_positions(attention_mask, key_length)
        if cached:
            key_positions = row_positions
        elif position_ids is None:
            position_ids = key_positions = row_positions
    return position_ids, key_positions


def slice_visibility(attention_mask: Any, query_positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(batch|1, q, q)`` bool: query ``j`` of a forward attends to the key that query ``k`` brings (the forward's own
    keys, the last ``q`` of all keys): the block-causal pattern over ``query_positions`` ``(batch|1, q)``, and the
    caller's mask at those keys (2-D: not padding; 4-D bool: True; 4-D float: above ``finfo.min``)."""
    q_len = query_positions.shape[-1]
    visible = block_causal_pattern(query_positions, query_positions, block_size)[:, 0]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() in (2, 4):
        mask = attention_mask.to(query_positions.device)
        if mask.dim() == 2:
            return visible & (mask[:, None, -q_len:] != 0)
        mask = mask[:, 0, :, -q_len:]
        return visible & (mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min)
    return visible


def block_diffusion_training_mask(
    position_ids: torch.Tensor, block_size: int, padding_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(batch, 1, 2L, 2L)`` bool (True = attend): the attention rule of the block-diffusion training input
    ``[x_t | x_0]`` (BD3-LM's vectorized layout; both halves carry the same ``position_ids``).

    With ``b(i) = position_ids[i] // block_size``: a noisy query ``i`` sees the noisy keys ``j`` with ``b(j) = b(i)``
    and the clean keys with ``b(j) < b(i)``; a clean query ``i`` sees the clean keys with ``b(j) <= b(i)``. No query
    sees a padding key (``padding_mask`` ``(batch, L)``, 0 = padding), except its own key, so no row is empty. The
    rule is a subset of the block-causal pattern over ``cat([position_ids, position_ids], 1)``.

    Args:
        position_ids: ``(batch, L)`` or ``(L,)`` integer positions of one half.
        block_size: ``K >= 1``.
        padding_mask: ``(batch, L)`` 1 = real token, 0 = padding; None = no padding.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be an integer >= 1, got {block_size!r}.")
    if (
        not isinstance(position_ids, torch.Tensor)
        or position_ids.dim() not in (1, 2)
        or position_ids.is_floating_point()
    ):
        raise ValueError(
            f"`position_ids` must be an integer tensor of shape (batch, L) or (L,), got {_shape(position_ids)}."
        )
    pos = position_ids[None] if position_ids.dim() == 1 else position_ids
    batch, length = pos.shape
    if padding_mask is not None:
        if not isinstance(padding_mask, torch.Tensor) or padding_mask.dim() != 2 or padding_mask.shape[1] != length:
            raise ValueError(
                f"`padding_mask` must have shape (batch, L) = {(batch, length)}, got {_shape(padding_mask)}."
            )
        batch = max(batch, padding_mask.shape[0])
    blocks = pos.long() // block_size
    query, key = blocks[:, :, None], blocks[:, None, :]
    same, earlier = key == query, key < query
    noisy = torch.cat([same, earlier], dim=2)  # noisy queries: [noisy keys | clean keys]
    clean = torch.cat([torch.zeros_like(same), same | earlier], dim=2)  # clean queries: [nothing | clean keys]
    allowed = torch.cat([noisy, clean], dim=1).expand(batch, 2 * length, 2 * length)
    if padding_mask is not None:
        real = (padding_mask.to(pos.device) != 0).repeat(1, 2)
        own = torch.eye(2 * length, dtype=torch.bool, device=pos.device)
        allowed = allowed & real[:, None, :] | own
    return allowed[:, None].contiguous()


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
        if block_size is not None:
            raise ValueError(
                f"attn_implementation={implementation!r} cannot express the block-causal pattern of a model with "
                f"block_size={block_size}; use 'sdpa', 'eager' or 'flex_attention'."
            )
        if additive is not None or attention_mask is not None and attention_mask.dim() == 4:
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


__all__ = [
    "block_causal_pattern",
    "block_diffusion_training_mask",
    "create_attention_mask",
    "padding_positions",
    "pattern_positions",
    "slice_visibility",
]
