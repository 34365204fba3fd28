"""Block-diffusion sampling: generation block by block for a model with ``config.block_size = K``, with an exact
key/value cache of the finished blocks.

Such a model attends bidirectionally inside a block of ``L`` positions and causally across blocks (blocks counted
from position 0 of each row, the prompt included), so a finished block never changes what came before it and its
keys and values can be cached exactly. ``L`` is the scheduler's ``block_length`` (default: the model's ``K``; a
multiple of ``K`` decodes with larger blocks than the model was trained with, as SDAR allows: every forward then
attends in blocks of ``L``).

* **Layout.** Row ``r`` with a prompt of ``P_r`` tokens is left-padded by ``L * (max_s floor(P_s / L) - floor(P_r /
  L))`` columns, so that every row's first generated block (the prompt's last, partial block, whose prompt positions
  stay fixed; an all-mask block when ``P_r`` is a multiple of ``L``) starts at the same column. Row ``r`` generates
  ``n_r = ceil((P_r mod L + G) / L)`` blocks for ``G = gen_length`` (the rows' counts differ by at most one); the
  last is denoised whole and the output cut to ``G`` tokens. Positions come from the padding mask.
* **Steps.** ``num_inference_steps = N`` is split evenly over a row's blocks: block ``j`` gets ``N // n_r`` steps,
  one more when ``j < N mod n_r`` (at least one). Inside the block the scheduler runs on the block as its window
  (:func:`~dfm_hf.schedulers.utils.block_grid_windows`): :class:`~dfm_hf.ConfidenceUnmaskingScheduler` commits
  ``ceil(L / steps)`` positions a step (its ``"fixed"`` transfer schedule), or every position above
  ``confidence_threshold`` and at least that many (with ``threshold_rule="top1"``, Fast-dLLM's rule, ``N`` is the
  scheduler's :meth:`~dfm_hf.ConfidenceUnmaskingScheduler.inference_steps`: ``L`` steps per block, one position a
  step plus those above the threshold); :class:`~dfm_hf.DiscreteFlowScheduler` runs its time grid inside the block.
  All rows work on the same block columns at once; a row that has done its steps for the block waits.
* **Model calls** (:class:`~dfm_hf.generation.runner.BlockRunner`). The full blocks of the prompt and the first block
  run once; then each step runs only the open block as queries against the cache. The first call of a block runs
  ``[finished block | open block]``: it appends the finished block's keys and values and gives the open block's
  first-step logits (no extra call per block). ``kv_cache=None`` runs the same algorithm without the cache (every
  call recomputes the prefix under the block-causal mask) and gives the same tokens.
* **Stopping.** A row stops after the block in which it committed EOS; a stopped row runs no model.

Infilling (mask tokens inside the prompt) is refused: the open block attends only to earlier blocks, so it cannot
see the text after it; a model trained with fill-in-the-middle data that declares its FIM tokens
(``config.fim_token_ids``) infills through them instead (:mod:`~dfm_hf.generation.fim`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..schedulers.editing import timesteps_with_editing
from ..schedulers.utils import block_grid_windows
from .call import SamplingCall, SamplingResult
from .callbacks import run_step_callback
from .runner import BlockRunner
from .streamers import DraftFeed


@dataclass
class BlockLayout:
    """The left-padded rows of a block-diffusion call (host tensors).

    Args:
        sample: (batch, length) ids: ``[padding | prompt | masks up to the end of the row's last block | padding]``.
        condition: (batch, length) bool, the given tokens and every padding column (never generated).
        attention: (batch, length) 1 at the prompt and the row's blocks, 0 at padding.
        generated: (batch, length) bool, the ``gen_length`` positions each row returns.
        start: the column at which every row's first generated block starts.
        block_length: ``L``, the columns of a block.
        num_blocks: blocks each row generates.
    """

    sample: torch.Tensor
    condition: torch.Tensor
    attention: torch.Tensor
    generated: torch.Tensor
    start: int
    block_length: int
    num_blocks: list[int]


def block_layout(
    prompts: list[list[int]], gen_length: int, block_length: int, mask_token_id: int, pad_token_id: int
) -> BlockLayout:
    """Lay the prompts out on the block grid (module docstring): each row's first generated block at one column."""
    full = [len(p) // block_length for p in prompts]
    top = max(full)
    start = top * block_length
    num_blocks = [-(-(len(p) % block_length + gen_length) // block_length) for p in prompts]
    length = start + block_length * max(num_blocks)
    batch = len(prompts)
    sample = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    generated = torch.zeros((batch, length), dtype=torch.bool)
    for r, ids in enumerate(prompts):
        offset = (top - full[r]) * block_length
        end = start + num_blocks[r] * block_length
        sample[r, offset : offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
        sample[r, offset + len(ids) : end] = mask_token_id
        attention[r, offset:end] = 1
        generated[r, offset + len(ids) : offset + len(ids) + gen_length] = True
    condition = ~(attention.bool() & (sample == mask_token_id))
    return BlockLayout(sample, condition, attention, generated, start, block_length, num_blocks)


def block_steps(num_blocks: list[int], num_inference_steps: int) -> torch.Tensor:
    """(batch, max blocks) long: the steps of each row's blocks, ``N // n_r`` and one more for the first
    ``N mod n_r`` blocks, at least 1; 0 past the row's last block."""
    width = max(num_blocks)
    steps = torch.zeros((len(num_blocks), width), dtype=torch.long)
    for r, n in enumerate(num_blocks):
        base, extra = divmod(num_inference_steps, n)
        steps[r, :n] = torch.tensor([max(base + (j < extra), 1) for j in range(n)])
    return steps


def sampler_block_length(model: torch.nn.Module, scheduler: Any) -> int:
    """``L``: the scheduler's ``block_length``, or the model's ``block_size`` ``K`` when it has none.

    ``L`` may be a multiple of ``K`` (decoding with larger blocks than the model was trained with, as SDAR does: the
    block-causal pattern then follows ``L``, passed to every forward). Raises ``ValueError`` naming both for any other
    ``L``, and for a scheduler whose source is not the mask (later blocks wait masked).
    """
    block_size = model.config.block_size
    if scheduler.config.get("source_distribution", "mask") != "mask":
        raise ValueError(
            f"A block-diffusion model (block_size={block_size}) generates its later blocks from masks: the scheduler "
            f"needs `source_distribution`='mask', got {scheduler.config.source_distribution!r}."
        )
    length = scheduler.config.get("block_length")
    if length is None:
        return block_size
    if length % block_size:
        raise ValueError(
            f"The scheduler's `block_length`={length} must be None or a multiple of the model's `block_size`="
            f"{block_size} (the model attends in blocks of `block_size`, or of a multiple of it)."
        )
    return length


def check_block_prompts(prompts: list[list[int]], mask_token_id: int, block_size: int) -> None:
    """Raise ``ValueError`` when a prompt holds the mask token: a block model cannot infill."""
    if any(mask_token_id in ids for ids in prompts):
        raise ValueError(
            f"Infilling (mask tokens inside the prompt) is not supported by a block-diffusion model (block_size="
            f"{block_size}): a block attends only to itself and earlier blocks, so the open block cannot see the text "
            "after it. Use a full-attention model or one trained with FIM tokens (`config.fim_token_ids`) to "
            "infill, or put the text to complete at the end of the prompt."
        )


def generate_blocks(
    call: SamplingCall,
    scheduler: Any,
    prompts: list[list[int]],
    gen_length: int,
    num_inference_steps: int,
    generator: Any,
    guidance_scale: float,
    cached: bool,
    skip_idle_steps: bool,
    use_logits_to_keep: bool,
    callback: Optional[Callable[..., dict]],
    tensor_inputs: list[str],
    return_full_text: bool,
    streamer: Optional[Any] = None,
) -> SamplingResult:
    """Run block-diffusion sampling for ``call`` (module docstring); ``cached`` selects the key/value cache.

    A callback gets ``(call.callback_owner, step, timestep, {"sample", "condition_mask"})`` after each step, with the
    left-padded rows of the whole layout; ``step`` counts the steps of the call and ``timestep`` is the block's own
    time. A ``streamer`` gets the columns before the first generated block, then the open block's columns as each
    draft and again when the block finishes (:mod:`dfm_hf.generation.streamers`).
    """
    model, mask, device = call.model, call.mask_token_id, call.device
    length = sampler_block_length(model, scheduler)
    layout = block_layout(prompts, gen_length, length, mask, call.pad_token_id)
    sample, condition = layout.sample.to(device), layout.condition.to(device)
    padded = not bool(layout.attention.all())
    attention = layout.attention.to(device) if padded else None
    positions = (layout.attention.cumsum(1) - 1).clamp(min=0) if padded else torch.arange(sample.shape[1])
    drop = condition & attention.bool() if padded else condition  # given tokens: masked when unconditional
    runner = BlockRunner(
        model,
        mask,
        attention,
        drop,
        positions.expand(sample.shape).to(device),
        skip_idle_steps,
        use_logits_to_keep,
        guidance_scale,
        cached,
        None if length == model.config.block_size else length,
    )
    num_steps = scheduler.inference_steps(num_inference_steps, max(layout.num_blocks) * length, length)
    call.set_num_timesteps(num_steps)
    steps = block_steps(layout.num_blocks, num_steps)
    eos = call.eos_token_ids
    active = torch.ones(sample.shape[0], dtype=torch.bool)  # rows still generating (host)
    ran = torch.zeros(sample.shape[0], dtype=torch.long)  # blocks each row has run
    count = 0
    feed = DraftFeed(streamer, call.pad_token_id)
    feed.put(sample[:, : layout.start])
    for j in call.progress_bar(range(steps.shape[1])):
        row_steps = torch.where(active, steps[:, j], 0)
        if not bool(row_steps.any()):
            break
        start, end = layout.start + j * length, layout.start + (j + 1) * length
        scheduler.set_timesteps(int(row_steps.max()), device=device)
        row_steps_device = row_steps.to(device)
        running = row_steps > 0  # the rows that work on this block (host)
        for i, t in timesteps_with_editing(scheduler):  # the grid, then LLaDA2.1's editing passes (if any)
            block, given = sample[:, start:end], condition[:, start:end]
            windows = block_grid_windows(~given, row_steps_device, i, j, length)
            plan = scheduler.plan_step(block, t, generator=generator, condition_mask=given, windows=windows)
            logits = runner.logits(sample, plan, start, end)
            block = scheduler.step(logits, t, block, generator=generator, condition_mask=given, plan=plan).prev_sample
            del logits
            sample = torch.cat([sample[:, :start], block, sample[:, end:]], dim=1)
            sample = run_step_callback(callback, call.callback_owner, count, t, sample, condition, tensor_inputs)
            count += 1
            feed.draft(sample[:, start:end], runner.nfe, running)
        feed.put(sample[:, start:end], running)
        ran += running.long()
        done = running & (ran == torch.tensor(layout.num_blocks))
        if eos is not None:
            block, free = sample[:, start:end].cpu(), ~layout.condition[:, start:end]
            done |= running & (torch.isin(block, eos) & free).any(1)
        active &= ~done
        runner.keep_rows(active[runner.rows.cpu()].to(device))
    feed.end()
    sample = sample.cpu()
    columns = torch.arange(sample.shape[1])
    reached = columns.unsqueeze(0) < (layout.start + ran * length).unsqueeze(1)
    generated = layout.generated & reached
    keep = generated | (layout.attention.bool() & layout.condition) if return_full_text else generated
    return SamplingResult(sample, keep, generated, runner.nfe)


__all__ = [
    "BlockLayout",
    "block_layout",
    "block_steps",
    "check_block_prompts",
    "generate_blocks",
    "sampler_block_length",
]
