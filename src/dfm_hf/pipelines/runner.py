"""The model calls of one generation (the model runner of :class:`~dfm_hf.pipelines.DFMPipeline`).

Step and row skipping, ``logits_to_keep``, classifier-free guidance and the approximate block key/value cache: the
runner turns the scheduler's :class:`~dfm_hf.schedulers.utils.StepPlan` into the packed logits the step reads.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..models.cache import DFMBlockCache
from ..schedulers.utils import StepPlan
from .kv_cache import BlockCacheState, keep_in_slice, query_positions


class ModelRunner:
    """The model calls of one generation: step and row skipping, ``logits_to_keep``, classifier-free guidance and
    the optional block key/value cache. ``nfe`` counts the forward passes run."""

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
        """Packed logits at ``plan.positions`` from a partial forward of the open window against the cache
        (refreshed first when a window opened or the cache is ``refresh_steps`` old)."""
        if not any(plan.counts):
            return self._empty(sample)
        rows = slice(None)
        if state.needs_refresh(plan.window_index):
            ids = self._inputs(sample, self.drop)
            nothing = torch.zeros_like(ids, dtype=torch.bool)
            cache = DFMBlockCache()
            self._forward(ids, rows, plan, past_key_values=cache, use_cache=True, logits_to_keep=nothing)
            state.refreshed(cache, plan.window_index)
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
        state.age += 1
        return self._combine(out.logits)
