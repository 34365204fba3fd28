"""The step-end callback contract shared by the pipeline's two loops (full-sequence and block by block)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch


def run_step_callback(
    callback: Optional[Callable[..., Any]],
    pipe: Any,
    step: int,
    timestep: Any,
    sample: torch.Tensor,
    condition: torch.Tensor,
    tensor_inputs: list[str],
) -> torch.Tensor:
    """Call ``callback(pipe, step, timestep, callback_kwargs)`` (diffusers' ``callback_on_step_end`` convention) and
    return the sample to continue from: the ``"sample"`` of the dict it returns, else ``sample``.

    ``callback_kwargs`` holds the names of ``tensor_inputs`` (``"sample"``, ``"condition_mask"``). The callback must
    return a dict (or None); a replacement ``"sample"`` must be an integer tensor shaped like ``sample``.
    """
    if callback is None:
        return sample
    local = {"sample": sample, "condition_mask": condition}
    out = callback(pipe, step, timestep, {k: local[k] for k in tensor_inputs})
    if out is None:
        return sample
    if not isinstance(out, dict):
        raise TypeError(
            "`callback_on_step_end` must return a dict of callback tensors (e.g. {'sample': ...}) or None, got "
            f"{type(out).__name__}."
        )
    new = out.get("sample", sample)
    if not isinstance(new, torch.Tensor) or new.shape != sample.shape or new.is_floating_point():
        raise TypeError(
            "the 'sample' returned by `callback_on_step_end` must be an integer tensor of shape "
            f"{tuple(sample.shape)}, got {tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__}."
        )
    return new
