"""The model calls of one generation (the model runners of :class:`~dfm_hf.pipelines.DFMPipeline`).

Step and row skipping, ``logits_to_keep``, classifier-free guidance and the approximate block key/value cache
(:class:`ModelRunner`), and the exact key/value cache of block-diffusion models (:class:`BlockRunner`): a runner turns
the scheduler's :class:`~dfm_hf.schedulers.utils.StepPlan` into the packed logits the step reads.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import DynamicCache

from ..models.cache import DFMBlockCache, crop_cache
from ..schedulers.utils import StepPlan
from .kv_cache import BlockCacheState, keep_in_slice, query_positions


class GuidedRunner:
    """What every model runner shares: the call's settings, classifier-free guidance (both branches stacked along
    the batch of one forward) and ``nfe``, the forward passes run."""

    def __init__(
        self,
        model: torch.nn.Module,
        mask_token_id: int,
        attention: Optional[torch.Tensor],
        drop: torch.Tensor,
        skip_idle_steps: bool,
        use_logits_to_keep: bool,
        guidance_scale: float = 1.0,
    ) -> None:
        self.model = model
        self.guidance_scale = float(guidance_scale)  # frozen for the call: the batch layout depends on it
        self.attention = attention  # (batch, len) 1/0, or None when no row is padded
        self.drop = drop  # (batch, len) bool: the conditioning tokens the unconditional branch masks
        self.skip, self.keep = skip_idle_steps, use_logits_to_keep
        config = model.config
        self.time_conditioned = bool(getattr(config, "time_conditioning", False))
        self.shift = bool(getattr(config, "logits_shift", False))
        self.vocab_size = config.vocab_size
        self.mask = mask_token_id
        self.nfe = 0

    def _cfg(self) -> bool:
        return self.guidance_scale != 1.0

    def _twice(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` for both branches: repeated along the batch under guidance."""
        return torch.cat([x, x]) if self._cfg() else x

    def _inputs(self, ids: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """``ids``, followed by its unconditional copy (conditioning tokens masked) under guidance."""
        return torch.cat([ids, ids.masked_fill(drop, self.mask)]) if self._cfg() else ids

    def _combine(self, logits: torch.Tensor) -> torch.Tensor:
        """``uncond + w * (cond - uncond)`` from the two halves of a guided forward."""
        if not self._cfg():
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _empty(self, sample: torch.Tensor) -> torch.Tensor:
        return torch.empty((0, self.vocab_size), dtype=torch.float32, device=sample.device)


class ModelRunner(GuidedRunner):
    """The model calls of one generation of a full-attention model: step and row skipping, ``logits_to_keep``,
    classifier-free guidance and the optional approximate block key/value cache."""

    def _forward(self, ids: torch.Tensor, rows: Any, plan: StepPlan, **kwargs: Any) -> Any:
        attention = None if self.attention is None else self._twice(self.attention[rows])
        timesteps = self._twice(plan.timesteps[rows]) if self.time_conditioned else None
        self.nfe += 1
        return self.model(input_ids=ids, attention_mask=attention, timesteps=timesteps, **kwargs)

    def logits(self, sample: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Logits the step reads: packed rows at ``plan.positions``, or full ones without ``skip_idle_steps``."""
        if not self.skip:
            ids = self._inputs(sample, self.drop)
            return self._combine(self._forward(ids, slice(None), plan).logits)
        active = [count > 0 for count in plan.counts]
        if not any(active):
            return self._empty(sample)
        rows: Any = slice(None)
        if not all(active):
            rows = torch.tensor([b for b, a in enumerate(active) if a], device=sample.device)
        needs = plan.positions[rows]
        ids = self._inputs(sample[rows], self.drop[rows])
        if self.keep:
            out = self._forward(ids, rows, plan, logits_to_keep=self._twice(needs))
            return self._combine(out.logits)
        return self._combine(self._forward(ids, rows, plan).logits)[needs]

    def cached_logits(self, sample: torch.Tensor, plan: StepPlan, state: BlockCacheState) -> torch.Tensor:
        """Packed logits at ``plan.positions``: from the full forward that refreshes the cache when a window opened or
        the cache is ``refresh_steps`` old (it sees the current tokens, so it serves the step: one forward), else
        from a partial forward of the open window against the cache."""
        if not any(plan.counts):
            return self._empty(sample)
        rows = slice(None)
        if state.needs_refresh(plan.window_index):
            cache = DFMBlockCache()
            ids = self._inputs(sample, self.drop)
            keep = self._twice(plan.positions)
            out = self._forward(ids, rows, plan, past_key_values=cache, use_cache=True, logits_to_keep=keep)
            state.refreshed(cache, plan.window_index, age=1)  # one step old once this step commits
            return self._combine(out.logits)
        state.age += 1
        query = query_positions(plan.window, state.mode, self.shift)
        keep = keep_in_slice(plan.positions, query)
        ids = self._inputs(sample.gather(1, query), self.drop.gather(1, query))
        out = self._forward(
            ids,
            rows,
            plan,
            position_ids=self._twice(query),
            past_key_values=state.cache,  # rewritten in place at the query positions, before they are read
            logits_to_keep=self._twice(keep),
        )
        return self._combine(out.logits)


class BlockRunner(GuidedRunner):
    """The model calls of block-diffusion sampling (a model with ``config.block_size``): each call reads the logits
    of the open block, columns ``[c0, c1)`` of the rows, which attend to themselves and to every earlier column.

    With ``cached=True`` the keys and values of the finished blocks live in a ``DynamicCache`` (both guidance branches
    stacked along the batch): a step runs only the open block as queries against it (they are appended, then cropped
    off again); the first call of a block runs ``[previous block | open block]`` and keeps the previous block's keys
    and values, exact since a finished block never changes (the first call of all runs every column up to the open
    block's end). Without the cache every call recomputes the columns ``[0, c1)``. ``rows`` are the batch rows the
    runner serves (all at first; finished rows are dropped with :meth:`keep_rows` and run no model again).
    ``block_size``: the block length every forward attends in, when the sampler's blocks are a multiple of the
    model's (None: the model's own).

    With ``logits_shift`` a block's first token is predicted from the hidden state of the previous block's last
    position: the cached step forward does not hold it, so its logits come from the call that opened the block.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mask_token_id: int,
        attention: Optional[torch.Tensor],
        drop: torch.Tensor,
        positions: torch.Tensor,
        skip_idle_steps: bool,
        use_logits_to_keep: bool,
        guidance_scale: float,
        cached: bool,
        block_size: Optional[int] = None,
    ) -> None:
        super().__init__(model, mask_token_id, attention, drop, skip_idle_steps, use_logits_to_keep, guidance_scale)
        self.block_size = block_size  # the blocks every forward attends in, when not the model's own
        self.positions = positions  # (batch, len) the rows' positions (padding does not count)
        self.rows = torch.arange(drop.shape[0], device=drop.device)
        self.cache = DynamicCache() if cached else None
        self.committed = 0  # columns whose keys and values the cache holds
        self.first: Optional[torch.Tensor] = None  # (rows, vocab) logits of the open block's first column (shift)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Serve only the rows of ``self.rows`` where ``keep`` (bool, one per served row) is True from now on."""
        if bool(keep.all()):
            return
        if self.cache is not None and self.cache.get_seq_length() > 0:
            index = keep.nonzero().squeeze(1)
            self.cache.batch_select_indices(torch.cat([index, index + keep.numel()]) if self._cfg() else index)
        if self.first is not None:
            self.first = self.first[keep]
        self.rows = self.rows[keep]

    def logits(self, sample: torch.Tensor, plan: StepPlan, start: int, end: int) -> torch.Tensor:
        """Packed logits at ``plan.positions`` (made over the block columns ``[start, end)`` of ``sample``)."""
        needs = plan.positions
        opening = self.cache is not None and self.committed < start
        rows = self.rows
        if not opening and self.skip:
            if not any(plan.counts):
                return self._empty(sample)
            if self.cache is None:
                rows = rows[needs[rows].any(1)]
        if rows.numel() == 0:
            return self._empty(sample)
        q0 = self.committed if self.cache is not None else 0
        offset = start - q0
        keep = torch.zeros((rows.numel(), end - q0), dtype=torch.bool, device=sample.device)
        keep[:, offset:] = needs[rows]
        first_rows = None
        if self.shift and self.cache is not None:  # rows whose block's first token reads the previous block
            first_rows = self.positions[rows, start] > 0
            if opening:
                keep[:, offset] |= first_rows
            else:
                keep[:, offset] &= ~first_rows
        out = self._run(sample, rows, q0, end, keep, plan)
        if self.cache is not None:
            crop_cache(self.cache, start)
            self.committed = start
        if first_rows is None or not bool(first_rows.any()):
            return out
        index = torch.full(keep.shape, -1, dtype=torch.long, device=sample.device)
        index[keep] = torch.arange(out.shape[0], device=sample.device)
        if opening:
            self.first = out[index[:, offset].clamp(min=0)]
        else:
            stored = needs[rows, 0] & first_rows
            index[:, offset][stored] = out.shape[0] + torch.arange(int(stored.sum()), device=sample.device)
            out = torch.cat([out, self.first[stored]])
        return out[index[:, offset:][needs[rows]]]

    def _run(
        self, sample: torch.Tensor, rows: torch.Tensor, q0: int, end: int, keep: torch.Tensor, plan: StepPlan
    ) -> torch.Tensor:
        """One forward of the columns ``[q0, end)`` of ``rows`` (appended to the cache when there is one); the
        combined logits at ``keep``, packed."""
        ids = self._inputs(sample[rows, q0:end], self.drop[rows, q0:end])
        kwargs: dict[str, Any] = {} if self.block_size is None else {"block_size": self.block_size}
        if self.attention is not None:
            kwargs["attention_mask"] = self._twice(self.attention[rows, :end])
        if self.cache is not None:
            kwargs["past_key_values"] = self.cache
            kwargs["position_ids"] = self._twice(self.positions[rows, q0:end])
        if self.time_conditioned:
            kwargs["timesteps"] = self._twice(plan.timesteps[rows])
        self.nfe += 1
        if self.keep:
            logits = self.model(input_ids=ids, logits_to_keep=self._twice(keep), **kwargs).logits
        else:
            logits = self.model(input_ids=ids, **kwargs).logits[self._twice(keep)]
        return self._combine(logits)
