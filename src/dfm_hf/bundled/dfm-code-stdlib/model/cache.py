"""Key/value caches of the DFM denoiser: :class:`DFMBlockCache`, the cache of a partial forward.

A bidirectional model attends over every position, so its cache holds the keys and values of all ``L`` positions of
the rows. A full forward fills it; a partial forward runs a slice of ``n`` query positions (their ``position_ids``),
writes their fresh keys and values at those positions and attends over all ``L`` entries. With entries computed from
the current tokens this is exact; with older ones (Fast-dLLM's prefix / dual cache) it is an approximation.

A block-diffusion model (``config.block_size`` set) uses transformers' own append semantics instead: a forward appends
its queries' keys and values to a ``DynamicCache`` and attends over the cache and itself, which is exact (no key of a
later block is ever seen); :func:`crop_cache` drops what the caller does not keep.

Only ``torch`` and ``transformers`` are imported: this file is copied next to the weights with the modeling file.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class DFMBlockCacheLayer(CacheLayerMixin):
    """One layer of :class:`DFMBlockCache`: keys and values ``(batch, kv_heads, L, head_dim)`` of every position.

    ``update`` without positions stores the given keys and values (a full forward); with ``cache_kwargs
    ["position_ids"]`` ``(batch, n)`` it writes them at those positions and returns all ``L`` entries. The write is
    in place when the layer owns its tensors, their dtype matches and no gradient flows into them; otherwise (a
    layer made from another cache's tensors, a dtype change, training) the layer's tensors are replaced by an updated
    copy, so the tensors it was made from are never modified.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.owned = keys is None
        if keys is not None and values is not None:
            self.keys, self.values = keys, values
            self.device = keys.device
            self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record the device of the first keys stored."""
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        cache_kwargs: Optional[dict[str, Any]] = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states`` / ``value_states`` (no positions), or write them at ``cache_kwargs["position_ids"]``;
        returns the keys and values to attend over."""
        positions = None if cache_kwargs is None else cache_kwargs.get("position_ids")
        if positions is None or self.keys is None or self.keys.numel() == 0:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values, self.owned = key_states, value_states, True
            return self.keys, self.values
        batch, heads, length, head_dim = key_states.shape
        index = positions[:, None, :, None].expand(batch, heads, length, head_dim)
        tracked = torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad)
        same_dtype = self.keys.dtype == key_states.dtype and self.values.dtype == value_states.dtype
        if self.owned and same_dtype and not tracked:
            self.keys.scatter_(2, index, key_states)
            self.values.scatter_(2, index, value_states)
        else:
            self.keys = self.keys.to(key_states.dtype).scatter(2, index, key_states)
            self.values = self.values.to(value_states.dtype).scatter(2, index, value_states)
            self.owned = True
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """``L``, the number of positions held (0 before the first update)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        """``L``: a partial forward writes inside the cache, it never grows it."""
        return self.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)``: the queries attend over all ``L`` entries."""
        return (self.get_seq_length() or query_length), 0

    def reset(self) -> None:
        """Drop the stored tensors."""
        self.keys = self.values = None
        self.is_initialized, self.owned = False, True


class DFMBlockCache(Cache):
    """The key/value cache of a partial forward: every layer's keys and values of all ``L`` positions.

    Pass an empty one with ``use_cache=True`` to a full forward to fill it, then pass it with ``position_ids`` to
    partial forwards: each writes its queries' fresh keys and values into it (in place, see
    :class:`DFMBlockCacheLayer`) and attends over all entries. ``DFMBlockCache(key_values)`` wraps existing
    ``(keys, values)`` pairs without copying; its first write to a layer copies that layer, so the tensors passed in
    are never modified (that is how a ``DynamicCache`` or a sequence of pairs given to a partial forward is read).
    """

    def __init__(self, key_values: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        if key_values is None:
            super().__init__(layer_class_to_replicate=DFMBlockCacheLayer)
        else:
            super().__init__(layers=[DFMBlockCacheLayer(keys, values) for keys, values in key_values])


def _key_values(past_key_values: Any) -> list[tuple[Any, Any]]:
    """The ``(keys, values)`` of every layer of a ``Cache`` or a sequence of pairs."""
    if isinstance(past_key_values, Cache):
        return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in past_key_values.layers]
    if isinstance(past_key_values, (list, tuple)):
        pairs = []
        for item in past_key_values:
            if not isinstance(item, (list, tuple)) or len(item) < 2:
                raise ValueError(
                    "`past_key_values` must be a transformers `Cache` or a sequence of (keys, values) pairs, got an "
                    f"item of type {type(item).__name__}."
                )
            pairs.append((item[0], item[1]))
        return pairs
    raise ValueError(
        "`past_key_values` must be None, a transformers `Cache` (e.g. the one returned by `use_cache=True` or a "
        f"`DFMBlockCache`) or a sequence of (keys, values) pairs, got {type(past_key_values).__name__}."
    )


def prepare_cache(past_key_values: Any, block_size: Optional[int] = None) -> tuple[Optional[Cache], bool]:
    """``(cache, partial)``: the cache a forward reads and writes, and whether it holds entries (a partial forward).

    Full attention (``block_size`` None): an empty ``Cache`` is returned as is (a full forward fills it); a
    :class:`DFMBlockCache` with entries too (it is written in place); the entries of any other ``Cache`` or of a
    sequence of pairs are wrapped in a new :class:`DFMBlockCache` (written in a copy).

    Block diffusion (``block_size`` set): ``past_key_values`` must be a transformers ``Cache`` other than
    :class:`DFMBlockCache` (a ``DynamicCache``); it is returned as is and the forward appends to it.
    """
    if past_key_values is None:
        return None, False
    if block_size is not None:
        if isinstance(past_key_values, DFMBlockCache) or not isinstance(past_key_values, Cache):
            raise ValueError(
                f"A block-diffusion model (block_size={block_size}) appends to a transformers `Cache` (e.g. "
                f"`DynamicCache()`, cut back with `dfm_hf.models.cache.crop_cache`); `past_key_values` of type "
                f"{type(past_key_values).__name__} is not accepted (`DFMBlockCache` is the approximate cache of "
                "full-attention models)."
            )
        return past_key_values, past_key_values.get_seq_length() > 0
    pairs = _key_values(past_key_values)
    empty = not pairs or any(k is None or v is None or k.numel() == 0 for k, v in pairs)
    if empty:
        if isinstance(past_key_values, Cache):
            return past_key_values, False
        return None, False
    if isinstance(past_key_values, DFMBlockCache):
        return past_key_values, True
    return DFMBlockCache(pairs), True


def check_cache(cache: Cache, config: Any, batch: int, position_ids: Optional[torch.Tensor], appended: int = 0) -> int:
    """The length ``L`` of a cache holding entries; raises ``ValueError`` naming ``past_key_values`` unless it holds
    ``config.num_hidden_layers`` layers of keys and values ``(batch, num_key_value_heads, L, head_dim)`` with
    ``L + appended <= max_position_embeddings`` (``appended``: the queries a block model adds to it), and naming
    ``position_ids`` when they are missing."""
    pairs = _key_values(cache)
    if len(pairs) != config.num_hidden_layers:
        raise ValueError(
            f"`past_key_values` must hold num_hidden_layers={config.num_hidden_layers} layers, got {len(pairs)}."
        )
    keys = pairs[0][0]
    expected = (batch, config.num_key_value_heads, keys.shape[-2] if keys.dim() == 4 else -1, config.head_dim)
    for k, v in pairs:
        if k.dim() != 4 or tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(
                "`past_key_values` layers must hold keys and values of shape (batch, num_key_value_heads, len, "
                f"head_dim) = {expected}, got {tuple(k.shape)} and {tuple(v.shape)}."
            )
    if expected[2] + appended > config.max_position_embeddings:
        added = f" + {appended} new positions" if appended else ""
        raise ValueError(
            f"`past_key_values` has length {expected[2]}{added} > max_position_embeddings "
            f"({config.max_position_embeddings})."
        )
    if position_ids is None:
        raise ValueError(
            "`position_ids` (batch, len): the absolute positions of the `input_ids` slice, are required with "
            "`past_key_values` holding entries."
        )
    return expected[2]


def crop_cache(cache: Cache, length: int) -> None:
    """Keep the first ``length`` entries of every layer of an append-style ``cache`` (a ``DynamicCache``), in place.

    ``length`` is the number of positions kept, ``0 <= length <= cache.get_seq_length()``. (transformers'
    ``Cache.crop`` takes the number of entries to remove, as a negative int; this takes the length kept.)
    """
    current = cache.get_seq_length()
    if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= current:
        raise ValueError(f"`length` must be an integer in [0, {current}] (the cache length), got {length!r}.")
    if length < current:
        cache.crop(length - current)


__all__ = ["DFMBlockCache", "DFMBlockCacheLayer", "check_cache", "crop_cache", "prepare_cache"]
