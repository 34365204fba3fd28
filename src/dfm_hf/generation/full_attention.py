"""The sampling loop of a full-attention model: ``[prompt | masks]`` rows, right-padded, denoised step by step.

Each step: the scheduler's :meth:`plan_step` says which positions read logits -> the model runs only on the rows
that have such positions and computes its LM head only there (:class:`~dfm_hf.generation.runner.ModelRunner`); a
step in which no position can move runs no model at all (exact: its logits would not be read) ->
``scheduler.step`` -> the step-end callback and the streamer. With ``kv_cache="prefix"`` / ``"dual"`` the model
calls go through the approximate block cache (:mod:`~dfm_hf.generation.kv_cache`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from ..rng import uniform_tokens_at
from ..schedulers.editing import timesteps_with_editing
from .call import SamplingCall, SamplingResult
from .callbacks import run_step_callback
from .kv_cache import BlockCacheState
from .runner import ModelRunner
from .streamers import DraftFeed


def right_padded(
    prompts: list[list[int]], gen_length: int, mask_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out ``[prompt | gen_length masks]`` rows, right-padded with ``pad_token_id``.

    Returns ``(sample, condition_mask, attention_mask, generated_mask)`` (host tensors); ``condition_mask`` is True
    at given tokens and padding, ``generated_mask`` at the positions to generate (the appended masks and the mask
    tokens inside a prompt).
    """
    rows = [ids + [mask_token_id] * gen_length for ids in prompts]
    length = max(len(r) for r in rows)
    sample = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        sample[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[b, : len(row)] = 1
    generated = (sample == mask_token_id) & attention.bool()
    return sample, ~generated, attention, generated


def generate_full_attention(
    call: SamplingCall,
    scheduler: Any,
    prompts: list[list[int]],
    gen_length: int,
    num_inference_steps: int,
    generator: Any,
    guidance_scale: float,
    skip_idle_steps: bool,
    use_logits_to_keep: bool,
    callback: Optional[Callable[..., dict]],
    tensor_inputs: list[str],
    return_full_text: bool,
    kv_cache: Optional[str] = None,
    kv_cache_refresh_steps: Optional[int] = None,
    streamer: Optional[Any] = None,
) -> SamplingResult:
    """Run the sampling loop of a full-attention model for ``call`` (module docstring).

    A callback gets ``(call.callback_owner, step, timestep, {"sample", "condition_mask"})`` after each step; a
    ``streamer`` gets the columns before the first generated one, a draft after each step, and the final canvas.
    """
    mask = call.mask_token_id
    sample, condition, attention, generated = right_padded(prompts, gen_length, mask, call.pad_token_id)
    padded = not bool(attention.all())  # checked once per call, on the host tensors
    device = call.device
    if scheduler.config.get("source_distribution", "mask") == "uniform":
        # the source x0 of a uniform-source flow: i.i.d. tokens (never the mask) at the positions to generate
        counts, vocab = generated.sum(1).tolist(), call.model.config.vocab_size
        sample[generated] = uniform_tokens_at(counts, vocab, scheduler.config.mask_token_id, generator, "cpu")
    sample, condition = sample.to(device), condition.to(device)
    attention = attention.to(device) if padded else None
    positions, block_length = int(generated.sum(1).max()), scheduler.config.get("block_length")
    num_steps = scheduler.inference_steps(num_inference_steps, positions, block_length)
    call.set_num_timesteps(num_steps)
    scheduler.set_timesteps(num_steps, device=device)
    drop = condition & attention.bool() if padded else condition  # given tokens: masked when unconditional
    runner = ModelRunner(call.model, mask, attention, drop, skip_idle_steps, use_logits_to_keep, guidance_scale)
    kv_state = BlockCacheState(kv_cache, kv_cache_refresh_steps) if kv_cache else None
    first = int(generated.any(0).nonzero()[0])  # the streamed canvas: from the first column a row generates
    feed = DraftFeed(streamer, call.pad_token_id)
    feed.put(sample[:, :first])
    for i, t in timesteps_with_editing(scheduler, call.progress_bar(scheduler.timesteps)):  # then editing passes
        plan = scheduler.plan_step(sample, t, generator=generator, condition_mask=condition)
        if kv_state is not None:
            logits = runner.cached_logits(sample, plan, kv_state)
        else:
            logits = runner.logits(sample, plan)
        sample = scheduler.step(logits, t, sample, generator=generator, condition_mask=condition, plan=plan).prev_sample
        del logits  # release this step's logits now: otherwise they stay alive through the next forward pass
        sample = run_step_callback(callback, call.callback_owner, i, t, sample, condition, tensor_inputs)
        feed.draft(sample[:, first:], runner.nfe)
    feed.put(sample[:, first:])
    feed.end()
    keep = (attention.bool() if padded else torch.ones_like(condition)) if return_full_text else generated
    return SamplingResult(sample.cpu(), keep.cpu(), generated.cpu(), runner.nfe)


def pack_rows(sample: torch.Tensor, keep: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The kept positions of each row, left-aligned and right-padded with ``pad_token_id``."""
    counts = keep.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((sample.shape[0], width), pad_token_id, dtype=sample.dtype, device=sample.device)
    pos = torch.arange(width, device=sample.device).expand(sample.shape[0], width)
    out[pos < counts.unsqueeze(1)] = sample[keep]
    return out


__all__ = ["generate_full_attention", "pack_rows", "right_padded"]
