"""diffusers' discrete schedulers in :class:`~dfm_hf.DFMPipeline`: adapters presenting ``BlockRefinementScheduler``,
``EntropyBoundScheduler`` and ``DiscreteDDIMScheduler`` through our scheduler contract (``set_timesteps``,
``plan_step`` -> :class:`~dfm_hf.schedulers.utils.StepPlan`, ``step(..., plan=)``), so that the pipeline's own loops
(full-sequence and block by block) run them with every feature that applies.

diffusers' discrete schedulers see one block at a time: ``set_timesteps(S)`` (``BlockRefinementScheduler`` also
takes the block length ``W``) and ``step(logits, j, block)`` at the step index ``j = 0, ..., S - 1`` of the block.
An adapter gives each row's open window (a block-diffusion model's block, or the window of blocks of
:func:`~dfm_hf.schedulers.utils.block_windows` that LLaDA's split opens at our step ``i``, with its ``S`` steps and
its local step ``j``) to the diffusers scheduler as that block: the window's positions, gathered left to right
(rows whose windows differ in ``S``, ``j`` or ``W`` are stepped separately, and each row alone with a list of
generators). The model reads logits only where the step may move a token (the masked positions of the window for
``BlockRefinementScheduler``; every position to generate for the uniform-source schedulers), so ``logits_to_keep``,
row skipping, guidance and the key/value caches work unchanged.

* ``BlockRefinementScheduler`` (mask source, blocks of its ``block_length``): commits by confidence, ``temperature``,
  ``top_k``, ``top_p`` per call; its ``editing_threshold`` is refused (its editing runs in ``LLaDA2Pipeline``'s loop;
  our :class:`~dfm_hf.ConfidenceUnmaskingScheduler` has LLaDA2.1's editing).
* ``DiscreteDDIMScheduler``, ``EntropyBoundScheduler`` (uniform source, no blocks; full-attention models only): the
  whole generated region is the block, our step ``i`` of ``N`` its step ``j = i`` of ``S = N``.
  ``DiscreteDDIMScheduler`` takes ``temperature`` per call; its corrector sweeps (``corrector_steps > 0``) need
  extra model calls per step and are refused, as are sampling options ``EntropyBoundScheduler`` does not have (it
  anneals its own temperature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from diffusers import BlockRefinementScheduler, DiscreteDDIMScheduler, EntropyBoundScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import BaseOutput

from ..rng import GeneratorLike, check_generator, row_counts
from ..schedulers.utils import BlockWindows, StepPlan, block_windows, validate_num_inference_steps

#: diffusers' discrete schedulers that :class:`~dfm_hf.DFMPipeline` runs through an adapter.
FOREIGN_SCHEDULERS = (BlockRefinementScheduler, EntropyBoundScheduler, DiscreteDDIMScheduler)


@dataclass
class ForeignStepPlan(StepPlan):
    """A :class:`StepPlan` with each row's block as the diffusers scheduler sees it: ``span`` (its steps ``S``),
    ``local`` (the step index ``j``) and ``width`` (``W``), (batch,) long; ``region`` (batch, length) bool, the
    positions gathered into the block."""

    span: Optional[torch.LongTensor] = None
    local: Optional[torch.LongTensor] = None
    width: Optional[torch.LongTensor] = None
    region: Optional[torch.BoolTensor] = None


@dataclass
class ForeignStepOutput(BaseOutput):
    """Output of an adapter's ``step``: ``prev_sample``, the (batch, length) sample at the next step."""

    prev_sample: torch.LongTensor


class ForeignScheduler:
    """Our scheduler contract around a diffusers discrete scheduler (module docstring); subclasses say which
    positions a step reads and how the diffusers scheduler is called.

    Args:
        scheduler: the diffusers scheduler (its config is read at every step).
        mask_token_id: the model's mask id (None for a uniform source without one).
        vocab_size: the model's vocabulary.
        options: per-call keyword options of its ``step`` (``temperature``, ``top_k``, ``top_p``).
    """

    source_distribution = "mask"

    def __init__(self, scheduler: Any, mask_token_id: Optional[int], vocab_size: int, options: dict[str, Any]) -> None:
        self.scheduler = scheduler
        self.options = options
        self.config = FrozenDict(
            source_distribution=self.source_distribution,
            mask_token_id=mask_token_id,
            vocab_size=vocab_size,
            block_length=self._block_length(),
        )
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None

    def _block_length(self) -> Optional[int]:
        return None

    def inference_steps(self, num_inference_steps: int, positions: int, block_length: Optional[int] = None) -> int:
        """The steps a sampling loop runs: ``num_inference_steps`` (the step count of diffusers' schedulers binds)."""
        return validate_num_inference_steps(num_inference_steps)

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """``timesteps`` = the step indices ``0, ..., N - 1`` (diffusers' discrete convention)."""
        self.num_inference_steps = validate_num_inference_steps(num_inference_steps)
        self.timesteps = torch.arange(num_inference_steps, device=device)

    def _index(self, timestep: Union[int, torch.Tensor]) -> int:
        if self.num_inference_steps is None:
            raise ValueError("`set_timesteps` must be called before `plan_step`/`step`.")
        i = int(timestep)
        if not 0 <= i < self.num_inference_steps:
            raise ValueError(f"`timestep` must be a step index in [0, {self.num_inference_steps}), got {timestep!r}.")
        return i

    def plan_step(
        self,
        sample: torch.LongTensor,
        timestep: Union[int, torch.Tensor],
        generator: GeneratorLike = None,
        condition_mask: Optional[torch.Tensor] = None,
        windows: Optional[BlockWindows] = None,
    ) -> ForeignStepPlan:
        """The plan of step ``timestep``: each row's block (``region``, ``span``, ``local``, ``width``) and the
        positions whose logits the step reads. Draws nothing."""
        check_generator(generator, sample.shape[0])
        i = self._index(timestep)
        free = torch.ones_like(sample, dtype=torch.bool) if condition_mask is None else ~condition_mask.bool()
        return self._plan(sample, i, free, windows)

    def _plan(
        self, sample: torch.Tensor, i: int, free: torch.Tensor, windows: Optional[BlockWindows]
    ) -> ForeignStepPlan:
        raise NotImplementedError

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.LongTensor,
        generator: GeneratorLike = None,
        return_dict: bool = True,
        condition_mask: Optional[torch.Tensor] = None,
        plan: Optional[ForeignStepPlan] = None,
    ) -> Union[ForeignStepOutput, tuple]:
        """Run the diffusers scheduler's ``step`` on each row's block and write the blocks back into ``sample``.

        ``model_output``: the (batch, length, vocab) logits, or the packed rows at ``plan.positions``.
        """
        if plan is None:
            plan = self.plan_step(sample, timestep, generator, condition_mask)
        rows = model_output[plan.positions] if model_output.dim() == 3 else model_output
        owner = plan.positions.nonzero()[:, 0]
        new = sample.clone()
        for group in self._groups(plan, generator):
            g = generator[int(group[0])] if isinstance(generator, (list, tuple)) else generator
            new[group] = self._step_block(rows[torch.isin(owner, group)], sample, plan, group, g)
        return ForeignStepOutput(prev_sample=new) if return_dict else (new,)

    @staticmethod
    def _groups(plan: ForeignStepPlan, generator: GeneratorLike) -> list[torch.Tensor]:
        """Rows stepped together: the rows that read logits, grouped by ``(span, local, width)`` (one row a group
        with a list of generators)."""
        active = torch.tensor(plan.counts, device=plan.positions.device) > 0
        keys = torch.stack([plan.span, plan.local, plan.width], dim=1)[active].tolist()
        rows = active.nonzero()[:, 0]
        groups: dict[tuple, list[int]] = {}
        for r, key in zip(rows.tolist(), keys):
            groups.setdefault((*key, r) if isinstance(generator, (list, tuple)) else tuple(key), []).append(r)
        return [torch.tensor(v, device=plan.positions.device) for v in groups.values()]

    def _step_block(
        self, rows: torch.Tensor, sample: torch.Tensor, plan: ForeignStepPlan, group: torch.Tensor, generator: Any
    ) -> torch.Tensor:
        """The ``group`` rows of ``sample`` after the diffusers step on their blocks (``rows``: their packed logits)."""
        region, needs, current = plan.region[group], plan.positions[group], sample[group]
        counts = region.sum(1)
        width = int(counts.max())
        order = torch.argsort((~region).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=sample.device) < counts.unsqueeze(1)
        mask = self.config.mask_token_id
        filler = 1 if mask == 0 else 0  # any id but the mask: padding columns of a short block never move
        block = current.gather(1, order).masked_fill(~valid, filler)
        logits = torch.zeros((group.numel(), width, rows.shape[-1]), dtype=rows.dtype, device=rows.device)
        logits[needs.gather(1, order) & valid] = rows
        device = generator.device if isinstance(generator, torch.Generator) else block.device
        span, local, span_width = (int(v[group[0]]) for v in (plan.span, plan.local, plan.width))
        prev = self._inner_step(logits.to(device), local, block.to(device), span, span_width, generator)
        prev = torch.where(valid, prev.to(sample.device), current.gather(1, order))
        return current.scatter(1, order, prev)

    def _inner_step(
        self, logits: torch.Tensor, j: int, block: torch.Tensor, steps: int, width: int, generator: Any
    ) -> torch.Tensor:
        raise NotImplementedError


class BlockRefinementAdapter(ForeignScheduler):
    """``BlockRefinementScheduler`` (mask source): a step reads the masked positions of each row's open window and
    the scheduler commits the most confident draws of the block (``threshold``, its even split of ``W`` commits over
    the ``S`` steps)."""

    def _block_length(self) -> Optional[int]:
        return self.scheduler.config.block_length

    def _plan(
        self, sample: torch.Tensor, i: int, free: torch.Tensor, windows: Optional[BlockWindows]
    ) -> ForeignStepPlan:
        if windows is None:
            windows = block_windows(free, self.config.block_length, i, self.num_inference_steps)
        span = windows.last_step - windows.first_step + 1
        local = i - windows.first_step
        needs = windows.window & (sample == self.config.mask_token_id)
        return ForeignStepPlan(
            step_index=i,
            positions=needs,
            counts=row_counts(needs),
            steps_left=span - local,
            window=windows.window,
            window_index=windows.num_open,
            timesteps=(local / span).to(torch.float32),
            span=span,
            local=local,
            width=windows.width,
            region=windows.window,
        )

    def _inner_step(
        self, logits: torch.Tensor, j: int, block: torch.Tensor, steps: int, width: int, generator: Any
    ) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=block.device, block_length=width)
        out = self.scheduler.step(
            logits, j, block, mask_token_id=self.config.mask_token_id, generator=generator, **self.options
        )
        return out.prev_sample


class UniformSourceAdapter(ForeignScheduler):
    """``DiscreteDDIMScheduler`` / ``EntropyBoundScheduler`` (uniform source, no mask token): every position to
    generate is read at every step, and step ``i`` of ``N`` is the scheduler's step ``i`` of ``N``."""

    source_distribution = "uniform"

    def _plan(
        self, sample: torch.Tensor, i: int, free: torch.Tensor, windows: Optional[BlockWindows]
    ) -> ForeignStepPlan:
        if windows is not None:
            raise ValueError(
                f"{type(self.scheduler).__name__} is a uniform-source scheduler: it cannot run the block windows of "
                "a block-diffusion model (later blocks wait masked); use BlockRefinementScheduler."
            )
        n = self.num_inference_steps
        batch = sample.shape[0]
        full = torch.full((batch,), n, dtype=torch.long, device=sample.device)
        return ForeignStepPlan(
            step_index=i,
            positions=free,
            counts=row_counts(free),
            steps_left=n - i,
            timesteps=torch.full((batch,), i / n, dtype=torch.float32, device=sample.device),
            span=full,
            local=torch.full_like(full, i),
            width=free.sum(1),
            region=free,
        )

    def _inner_step(
        self, logits: torch.Tensor, j: int, block: torch.Tensor, steps: int, width: int, generator: Any
    ) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=block.device)
        return self.scheduler.step(logits, j, block, generator=generator, **self.options).prev_sample


def adapt_scheduler(
    scheduler: Any,
    mask_token_id: Optional[int],
    vocab_size: int,
    block_size: Optional[int] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> ForeignScheduler:
    """The adapter that runs diffusers' discrete ``scheduler`` in :class:`~dfm_hf.DFMPipeline` (module docstring).

    ``block_size``: the model's (a block-diffusion model), which needs a mask-source scheduler. ``temperature``,
    ``top_k``, ``top_p``: the call's overrides, passed to the scheduler's ``step``. Raises ``ValueError`` naming the
    argument for a scheduler of another class, an option the scheduler does not take, or a setting the pipeline
    cannot run.
    """
    name = type(scheduler).__name__
    given = {k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)) if v is not None}
    if isinstance(scheduler, BlockRefinementScheduler):
        if mask_token_id is None:
            raise ValueError("`scheduler` BlockRefinementScheduler needs a mask token: the model has no mask_token_id.")
        editing = scheduler.config.editing_threshold
        if editing is not None and editing > 0:
            raise ValueError(
                f"BlockRefinementScheduler `editing_threshold`={editing}: its editing runs in LLaDA2Pipeline's loop "
                "only; in DFMPipeline set editing_threshold=None, or use LLaDA2.1's editing of "
                "ConfidenceUnmaskingScheduler(editing_threshold=...)."
            )
        return BlockRefinementAdapter(scheduler, mask_token_id, vocab_size, given)
    if not isinstance(scheduler, (DiscreteDDIMScheduler, EntropyBoundScheduler)):
        raise ValueError(
            "`scheduler` must be a DiscreteFlowScheduler, a ConfidenceUnmaskingScheduler or one of diffusers' "
            f"{[c.__name__ for c in FOREIGN_SCHEDULERS]}, got {name}."
        )
    if block_size is not None:
        raise ValueError(
            f"`scheduler` {name} is a uniform-source scheduler; a block-diffusion model (block_size={block_size}) "
            "generates its later blocks from masks: use BlockRefinementScheduler or one of ours."
        )
    accepted = ("temperature",) if isinstance(scheduler, DiscreteDDIMScheduler) else ()
    refused = [k for k in given if k not in accepted]
    if refused:
        raise ValueError(
            f"{refused} cannot be passed with {name}: its step takes {list(accepted) or 'no sampling options'}"
            + (" (it anneals its own temperature from t_max to t_min)." if not accepted else ".")
        )
    corrector = getattr(scheduler.config, "corrector_steps", 0)
    if corrector:
        raise ValueError(
            f"DiscreteDDIMScheduler `corrector_steps`={corrector}: DFMPipeline runs one model call per step and "
            "cannot run corrector sweeps; set corrector_steps=0."
        )
    return UniformSourceAdapter(scheduler, mask_token_id, vocab_size, given)
