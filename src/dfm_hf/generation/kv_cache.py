"""The approximate key/value cache of block-wise sampling (Fast-dLLM's prefix and dual caches), pipeline side.

A bidirectional model re-reads the whole sequence at every step. With a block scheduler only the open window of
blocks changes during a block's steps, so the keys and values of the other positions can be computed once, when the
window opens, and reused:

* ``"prefix"``: the model runs the positions from the window's start to the end of the row as queries, against the
  cached keys/values of the prefix (everything left of the window);
* ``"dual"``: the model runs only the window's positions as queries, against the cached keys/values of the prefix
  and of the still-masked suffix.

A full forward filling a new :class:`~dfm_hf.models.DFMBlockCache` computes the keys/values of every position (a
"refresh": when a window opens, and every ``refresh_steps`` steps inside it when asked). It sees the current tokens,
so it also gives the logits of its own step (one forward for that step, as in Fast-dLLM); the logits of the other
steps come from a partial forward of the query positions (``position_ids`` = their absolute positions,
``past_key_values`` = the cache, which each step rewrites in place at those positions). With ``refresh_steps=1`` every
step is such a full forward, exact up to float rounding; otherwise the cached states a partial forward reads are stale
(they were computed before the window's latest tokens were committed): that is the approximation. ``kv_cache=None``
is the exact path.

A block-diffusion model (``config.block_size``) needs none of this: its finished blocks never change, and its exact
cache is :class:`~dfm_hf.generation.runner.BlockRunner`'s (:func:`resolve_kv_cache` picks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..models.cache import DFMBlockCache

KV_CACHE_MODES = ("prefix", "dual")


def resolve_kv_cache(kv_cache: object, refresh_steps: object, scheduler: Any, model_config: Any) -> Optional[str]:
    """The key/value cache a call uses: ``"block"`` (the exact cache of a block-diffusion model), ``"prefix"``,
    ``"dual"`` or None.

    ``kv_cache="auto"`` (the default) is ``"block"`` for a block-diffusion model (``config.block_size`` set) without
    time conditioning (a time-conditioned model's keys depend on the step's time, so nothing can be cached exactly)
    and None otherwise. Raises ``ValueError`` unless ``kv_cache`` is ``"auto"``, None, ``"prefix"`` or ``"dual"``
    (the last two only for a full-attention model with a block scheduler), and unless ``refresh_steps`` is None or an
    integer >= 1 (only with ``"prefix"`` / ``"dual"``).
    """
    block_size = getattr(model_config, "block_size", None)
    if kv_cache == "auto" or kv_cache is None:
        if refresh_steps is not None:
            raise ValueError(
                f"`kv_cache_refresh_steps` needs `kv_cache`='prefix' or 'dual', got kv_cache={kv_cache!r}."
            )
        if kv_cache is None or block_size is None:
            return None
        return None if getattr(model_config, "time_conditioning", False) else "block"
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"`kv_cache` must be 'auto', None or one of {list(KV_CACHE_MODES)}, got {kv_cache!r}.")
    if block_size is not None:
        raise ValueError(
            f"`kv_cache`={kv_cache!r} is the approximate cache of full-attention models; a block-diffusion model "
            f"(block_size={block_size}) caches its finished blocks exactly: use kv_cache='auto' (the default) or None."
        )
    if getattr(scheduler.config, "block_length", None) is None:
        raise ValueError(
            f"`kv_cache`={kv_cache!r} needs a block scheduler (`block_length` set in the scheduler config, e.g. "
            "`pipe.load_scheduler_preset('confidence-blocks')`), got block_length=None."
        )
    if refresh_steps is not None and (
        isinstance(refresh_steps, bool) or not isinstance(refresh_steps, int) or refresh_steps < 1
    ):
        raise ValueError(f"`kv_cache_refresh_steps` must be None or an integer >= 1, got {refresh_steps!r}.")
    return kv_cache


def query_positions(window: torch.Tensor, mode: str, logits_shift: bool) -> torch.Tensor:
    """(batch, n) absolute positions a partial forward runs as queries, ascending in each row.

    ``"dual"``: the positions of the open ``window``; ``"prefix"``: every position from the window's first one to the
    end of the row. A ``logits_shift`` model predicts token ``p`` from the hidden state at ``p - 1``, so the position
    before the window's start is added. Rows are padded to a common ``n`` by repeating their last position (a
    repeated query recomputes the same keys/values and its logits are not kept).
    """
    batch, length = window.shape
    arange = torch.arange(length, device=window.device)
    has = window.any(1)
    start = torch.where(has, torch.where(window, arange, length).amin(1), 0)
    if logits_shift:
        start = (start - 1).clamp(min=0)
    if mode == "prefix":
        chosen = (arange.unsqueeze(0) >= start.unsqueeze(1)) & has.unsqueeze(1)
    else:
        chosen = window.clone()
        if logits_shift:
            chosen[torch.arange(batch, device=window.device), start] |= has
    counts = chosen.sum(1)
    n = max(int(counts.max()), 1) if batch else 1
    # ascending positions first (non-chosen sort after them as `length`), then pad with the row's last chosen one
    keyed = torch.where(chosen, arange, length).sort(1).values[:, :n]
    last = keyed.gather(1, (counts - 1).clamp(min=0).unsqueeze(1))
    last = torch.where(counts.unsqueeze(1) > 0, last, torch.zeros_like(last))
    return torch.where(keyed < length, keyed, last)


def keep_in_slice(positions: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(batch, n) bool: the slice entries whose token the step reads (``positions`` (batch, length) True there),
    each position kept once (padding repeats are dropped), so the packed logits come in row-major order."""
    keep = positions.gather(1, query)
    first = torch.ones_like(keep)
    first[:, 1:] = query[:, 1:] != query[:, :-1]
    return keep & first


@dataclass
class BlockCacheState:
    """Bookkeeping of one generation call: the cache, when it was computed, and for which window."""

    mode: str
    refresh_steps: Optional[int]
    cache: Optional[DFMBlockCache] = None
    window_index: Optional[torch.Tensor] = None
    age: int = 0
    refreshes: int = field(default=0)

    def needs_refresh(self, window_index: torch.Tensor) -> bool:
        """True when no cache exists, a window opened since it was computed, or it is ``refresh_steps`` old."""
        if self.cache is None or self.window_index is None:
            return True
        if not torch.equal(window_index, self.window_index):
            return True
        return self.refresh_steps is not None and self.age >= self.refresh_steps

    def refreshed(self, cache: DFMBlockCache, window_index: torch.Tensor, age: int = 0) -> None:
        """Record a cache computed now, for the window ``window_index``, that is ``age`` steps old (1: the step that
        computed it has read its logits)."""
        self.cache, self.window_index, self.age = cache, window_index.clone(), age
        self.refreshes += 1


__all__ = ["KV_CACHE_MODES", "BlockCacheState", "keep_in_slice", "query_positions", "resolve_kv_cache"]
