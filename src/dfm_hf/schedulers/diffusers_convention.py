"""diffusers' discrete-scheduler calling convention for our schedulers (:class:`DiffusersConventionMixin`).

diffusers' discrete pipelines (``LLaDA2Pipeline``, ``DiffusionGemmaPipeline``) drive a scheduler as::

    scheduler.set_timesteps(N, device=device, block_length=L)       # N steps per block of L positions
    out = scheduler.step(logits, i, block, mask_token_id=..., temperature=..., top_p=..., top_k=..., threshold=...,
                         prompt_mask=..., generator=..., return_dict=True)  # i = 0, ..., N - 1

and read ``out.prev_sample``, ``out.pred_logits`` and, in ``LLaDA2Pipeline``, ``out.transfer_index``,
``out.editing_transfer_index``, ``out.sampled_tokens``, ``out.sampled_probs``. Our schedulers take that form beside
their own (``step(logits, t, sample, plan=...)``). A call is in diffusers' form when it passes none of ``plan`` and
``condition_mask`` and either passes one of :data:`DIFFUSERS_STEP_OPTIONS`, gives ``timestep`` as a python ``int``
(the step index), or follows ``set_timesteps(..., block_length=L)``; our own loops never call it that way.

In that form step ``i`` of ``N`` is the step at our flow time ``t_i`` of the grid set by ``set_timesteps`` (``t_i =
i / N`` on the uniform grid: ``t = 0`` is the source, all masks or uniform noise, and ``t = 1`` the data). diffusers'
discrete timesteps run the other way, ``tau = 1 - t`` in ``(0, 1]`` (1 = noise), so step ``i`` is at ``tau = 1 -
t_i``. After ``set_timesteps(N, block_length=L)`` each ``sample`` is one block of ``L`` positions (its given
positions marked by ``prompt_mask``), generated in ``N`` steps of its own: a mask-source scheduler runs the block as
the window of a block-diffusion model (:func:`~dfm_hf.schedulers.utils.block_grid_windows`; the confidence
scheduler commits ``ceil(L / N)`` positions a step, its ``"fixed"`` transfer schedule), exactly as
:class:`~dfm_hf.DFMPipeline` runs each block of a block-diffusion model; a uniform-source scheduler runs its flow
over the whole block. Without ``block_length`` the step is our step on the whole sample.

Per-call options override the scheduler's config for that step: ``temperature``, ``top_k``, ``top_p`` (None keeps
the config's), ``sampling_method`` (``"greedy"`` is temperature 0; ``"auto"`` and ``"multinomial"`` keep the
temperature) and, for :class:`~dfm_hf.ConfidenceUnmaskingScheduler`, ``threshold`` (its ``confidence_threshold``).
``editing_threshold`` (LLaDA2.1's editing of committed tokens; None or <= 0: off) is the confidence scheduler's
``editing_threshold`` (its ``max_post_steps`` still caps the editing passes after the masks; ``LLaDA2Pipeline``'s
``max_post_steps`` caps its loop). The DFM sampler decides which positions move from its schedule, so it takes
``threshold`` and ``minimal_topk`` and has no use for them, and refuses a positive ``editing_threshold``.
``mask_token_id`` must be the config's (or None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from diffusers.utils import BaseOutput

from ..rng import GeneratorLike
from .utils import StepPlan, block_grid_windows, validate_block_length

#: Keyword options of diffusers' discrete ``step`` that our schedulers accept.
DIFFUSERS_STEP_OPTIONS = (
    "mask_token_id",
    "temperature",
    "top_p",
    "top_k",
    "threshold",
    "editing_threshold",
    "minimal_topk",
    "sampling_method",
    "prompt_mask",
)
SAMPLING_METHODS = ("auto", "greedy", "multinomial")


@dataclass
class DiscreteSchedulerOutput(BaseOutput):
    """Output of a step in diffusers' discrete-scheduler form (every tensor ``(batch, length)`` unless said).

    Args:
        prev_sample: the sample at the next step.
        pred_original_sample: the scheduler's estimate of the data (the drawn tokens where it read logits).
        pred_logits: ``(batch, length, vocab)``, the logits the step read (the ``model_output`` given).
        transfer_index: bool, positions that received a drawn token this step (for the mask source: were masked,
            are not any more).
        editing_transfer_index: bool, every other position whose token changed (a corrector's re-masking or
            uniform-noise jump).
        sampled_tokens: the drawn tokens (``pred_original_sample``).
        sampled_probs: float32, ``softmax(model_output)`` at ``sampled_tokens``.
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor
    pred_logits: torch.Tensor
    transfer_index: torch.BoolTensor
    editing_transfer_index: torch.BoolTensor
    sampled_tokens: torch.LongTensor
    sampled_probs: torch.Tensor


class DiffusersConventionMixin:
    """diffusers' discrete-scheduler calling convention (module docstring), mixed into our schedulers.

    The scheduler's ``set_timesteps`` hands its ``block_length`` to :meth:`_set_block_form` and its ``step`` hands a
    call to :meth:`diffusers_step` when :meth:`_is_diffusers_call` says so.
    """

    def _set_block_form(self, block_length: Optional[int]) -> None:
        """Record ``set_timesteps``' ``block_length``: None is our form, ``L`` diffusers' block-by-block form."""
        validate_block_length(block_length)
        self._block_form_length = block_length

    def _is_diffusers_call(
        self, timestep: Any, condition_mask: Optional[torch.Tensor], plan: Optional[StepPlan], options: dict
    ) -> bool:
        """Whether a ``step`` call is in diffusers' form (module docstring)."""
        if plan is not None or condition_mask is not None:
            if options:
                raise ValueError(
                    f"diffusers' step options {sorted(options)} cannot be combined with `plan` or `condition_mask` "
                    "(our own calling form)."
                )
            return False
        integer = isinstance(timestep, int) and not isinstance(timestep, bool)
        return bool(options) or integer or getattr(self, "_block_form_length", None) is not None

    def diffusers_step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.LongTensor,
        generator: GeneratorLike = None,
        return_dict: bool = True,
        **options: Any,
    ) -> Union[DiscreteSchedulerOutput, tuple]:
        """One step in diffusers' form (module docstring): ``model_output`` is the ``(batch, length, vocab)`` logits
        of ``sample``, ``timestep`` the step index ``i`` (or a value of ``self.timesteps``)."""
        unknown = sorted(set(options) - set(DIFFUSERS_STEP_OPTIONS))
        if unknown:
            raise TypeError(
                f"step() got unexpected keyword arguments {unknown}; accepted: {list(DIFFUSERS_STEP_OPTIONS)}."
            )
        if not isinstance(model_output, torch.Tensor) or model_output.dim() != 3:
            raise ValueError("`model_output` must be the (batch, length, vocab) logits of `sample` in diffusers' form.")
        i = self._index_for(timestep)
        scheduler = self._variant(options)
        condition = self._prompt_condition(options.get("prompt_mask"), sample)
        windows = None
        block_length = getattr(self, "_block_form_length", None)
        if block_length is not None:
            if sample.dim() != 2 or sample.shape[1] != block_length:
                raise ValueError(
                    f"`sample` must be one block of {block_length} positions (set_timesteps' `block_length`), got "
                    f"shape {tuple(sample.shape)}."
                )
            if scheduler.config.source_distribution == "mask":
                free = torch.ones_like(sample, dtype=torch.bool) if condition is None else ~condition
                steps = torch.full((sample.shape[0],), self.num_inference_steps, device=sample.device)
                windows = block_grid_windows(free, steps, i, 0, block_length)
        editor = getattr(scheduler, "token_editor", None)
        if editor is not None and i == 0:  # diffusers' loops start each block at step 0
            editor.reset()
        plan = scheduler.plan_step(sample, i, generator=generator, condition_mask=condition, windows=windows)
        out = scheduler.step(model_output, i, sample, generator=generator, condition_mask=condition, plan=plan)
        self._step_index = i + 1
        output = _output(scheduler, model_output, sample, out.prev_sample, out.pred_original_sample, plan)
        return output if return_dict else output.to_tuple()

    def _variant(self, options: dict) -> Any:
        """``self``, or a copy of it with the call's overrides in its config and the same time grid."""
        c = self.config
        if options.get("mask_token_id") is not None and options["mask_token_id"] != c.mask_token_id:
            raise ValueError(
                f"`mask_token_id`={options['mask_token_id']} disagrees with the scheduler's {c.mask_token_id}."
            )
        editing = options.get("editing_threshold")
        editing = editing if editing is not None and editing > 0 else None
        if editing is not None and "editing_threshold" not in c:
            raise ValueError(
                f"`editing_threshold`={editing}: {type(self).__name__} never edits a committed token (LLaDA2.1's "
                "editing is ConfidenceUnmaskingScheduler's); pass editing_threshold=None."
            )
        method = options.get("sampling_method")
        if method is not None and method not in SAMPLING_METHODS:
            raise ValueError(f"`sampling_method` must be one of {list(SAMPLING_METHODS)}, got {method!r}.")
        overrides = {k: options[k] for k in ("temperature", "top_k", "top_p") if options.get(k) is not None}
        if method == "greedy":
            overrides["temperature"] = 0.0
        if "editing_threshold" in options and "editing_threshold" in c:
            overrides["editing_threshold"] = editing
        if options.get("threshold") is not None and "confidence_threshold" in c:
            overrides["confidence_threshold"] = options["threshold"]
        overrides = {k: v for k, v in overrides.items() if c.get(k) != v}
        if not overrides:
            return self
        key = tuple(sorted(overrides.items()))
        cache = getattr(self, "_diffusers_variants", None)
        if cache is None or cache[0] is not self.config:
            cache = (self.config, {})
            self._diffusers_variants = cache
        variant = cache[1].get(key)
        if variant is None:
            variant = cache[1][key] = type(self).from_config(c, **overrides)
        if variant._times != self._times:
            variant.set_timesteps(self.num_inference_steps, device=self.timesteps.device)
        return variant

    @staticmethod
    def _prompt_condition(prompt_mask: Optional[torch.Tensor], sample: torch.Tensor) -> Optional[torch.Tensor]:
        """diffusers' ``prompt_mask`` (``(length,)`` or ``(batch, length)`` bool, True = given) as a condition mask."""
        if prompt_mask is None:
            return None
        if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.shape not in (sample.shape, sample.shape[1:]):
            raise ValueError(
                f"`prompt_mask` must be a bool tensor of shape {tuple(sample.shape[1:])} or {tuple(sample.shape)}."
            )
        return prompt_mask.bool().to(sample.device).expand(sample.shape)

    def check_eos_finished(
        self,
        cur_x: torch.LongTensor,
        sampled_tokens: torch.LongTensor,
        final_transfer: torch.BoolTensor,
        finished: torch.BoolTensor,
        eos_token_id: int,
        mask_token_id: int,
        prompt_length: int,
    ) -> torch.BoolTensor:
        """``finished`` updated as :class:`~dfm_hf.DFMPipeline` stops a row: after the block in which it generated
        EOS. A row is finished once the block it works on (the last ``block_length`` columns of ``cur_x``, all of
        them without a block length) holds no mask token and an EOS at a generated column (``>= prompt_length``)."""
        width = getattr(self, "_block_form_length", None) or cur_x.shape[1]
        start = cur_x.shape[1] - width
        block = cur_x[:, start:]
        generated = torch.arange(start, cur_x.shape[1], device=cur_x.device) >= prompt_length
        done = ~(block == mask_token_id).any(1) & ((block == eos_token_id) & generated).any(1)
        return finished | done

    def check_block_should_continue(
        self,
        step_idx: int,
        masks_remaining: bool,
        editing_enabled: bool,
        editing_transfer_index: torch.BoolTensor,
        post_steps: int,
        max_post_steps: int,
        finished: torch.BoolTensor,
    ) -> bool:
        """Whether diffusers' block loop takes another step while some row is unfinished: while the block held masks
        before the step and steps of the grid are left; once they are gone, while editing is on, the last pass edited
        a token and at most ``max_post_steps`` passes ran."""
        if bool(finished.all()):
            return False
        if masks_remaining:
            return step_idx < self.num_inference_steps
        edited = editing_transfer_index is not None and bool(editing_transfer_index.any())
        return bool(editing_enabled) and edited and post_steps <= max_post_steps


def _output(
    scheduler: Any,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    prev: torch.Tensor,
    drawn: Optional[torch.Tensor],
    plan: StepPlan,
) -> DiscreteSchedulerOutput:
    """The :class:`DiscreteSchedulerOutput` of a step from ``sample`` to ``prev``."""
    drawn = prev if drawn is None else drawn
    changed = prev != sample
    mask = scheduler.config.mask_token_id
    if plan.forward is not None:
        moved = plan.forward
    elif mask is not None:
        moved = sample == mask
    else:
        moved = torch.zeros_like(changed)
    transfer = changed & moved
    probs = torch.softmax(model_output.float(), dim=-1).gather(-1, drawn.unsqueeze(-1).to(model_output.device))
    return DiscreteSchedulerOutput(
        prev_sample=prev,
        pred_original_sample=drawn,
        pred_logits=model_output,
        transfer_index=transfer,
        editing_transfer_index=changed & ~transfer,
        sampled_tokens=drawn,
        sampled_probs=probs.squeeze(-1).to(prev.device),
    )
