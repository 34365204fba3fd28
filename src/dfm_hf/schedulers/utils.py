"""Logic shared by our schedulers: time-index lookup, input checks, and class resolution for `compatibles`."""

from __future__ import annotations

import bisect
import importlib
import math
from typing import Optional, Union

import torch


def validate_sampling_args(temperature: object, top_k: object, top_p: object) -> None:
    """Raise ``ValueError`` naming the argument unless temperature >= 0, top_k >= 1 (or None), 0 < top_p <= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"`temperature` must be a finite number >= 0, got {temperature!r}.")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0 = greedy), got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"`top_k` must be None or an integer >= 1, got {top_k!r}.")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
            raise ValueError(f"`top_p` must be None or a number in (0, 1], got {top_p!r}.")


class OurSchedulerMixin:
    """Mixed into each dfm_hf scheduler before diffusers' ``SchedulerMixin``.

    Expects ``self._times`` (the grid, ``N + 1`` python floats ending at 1.0), ``self.num_inference_steps`` and
    ``self._step_index`` to be maintained by the scheduler.
    """

    @classmethod
    def _get_compatibles(cls) -> list:
        """Resolve ``_compatibles`` names among dfm_hf's schedulers (diffusers only looks in its own namespace)."""
        ours = importlib.import_module("dfm_hf.schedulers")
        names = {cls.__name__, *cls._compatibles}
        return [getattr(ours, n) for n in sorted(names) if hasattr(ours, n)]

    def _index_for(self, timestep: Union[float, torch.Tensor]) -> int:
        """Index of ``timestep`` in the grid (``ValueError`` before ``set_timesteps`` or for a time off the grid)."""
        if not self._times:
            raise ValueError("`set_timesteps` must be called before `step`/`plan_step` (no time grid is set).")
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"`timestep` must be a scalar, got shape {tuple(timestep.shape)}.")
            if timestep.device.type != "cpu" and self._step_index is not None:
                return self._step_index  # avoid a host sync: steps are taken in grid order
            timestep = float(timestep)
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise ValueError(f"`timestep` must be a float from `scheduler.timesteps`, got {type(timestep).__name__}.")
        n = self.num_inference_steps
        i = bisect.bisect_left(self._times, timestep - 1e-6, 0, n)
        if i >= n or abs(self._times[i] - timestep) > 1e-6:
            raise ValueError(f"`timestep` {timestep!r} is not on the grid set by `set_timesteps` (see `.timesteps`).")
        return i

    def _check_sample(self, sample: torch.Tensor, condition_mask: Optional[torch.Tensor]) -> None:
        if not isinstance(sample, torch.Tensor) or sample.dim() != 2 or sample.is_floating_point():
            raise ValueError("`sample` must be a (batch, length) integer tensor of token ids.")
        if condition_mask is not None and (
            not isinstance(condition_mask, torch.Tensor) or condition_mask.shape != sample.shape
        ):
            raise ValueError(f"`condition_mask` must be a bool tensor shaped like `sample` {tuple(sample.shape)}.")
