"""`DiscreteFlowScheduler`: the Discrete Flow Matching sampler (Gat et al., NeurIPS 2024), diffusers style.

The model gives logits of the factorized posterior ``p_{1|t}(x^i | X_t)``. Over a step from ``t`` to ``t' = t + h``:

* forward velocity ``u^i = kappa'_t / (1 - kappa_t) * (p_{1|t}(. | X_t) - delta_{X_t^i})``, realised exactly in time
  for the mixture path: a free position jumps to a draw ``x1^i ~ p_{1|t}`` with probability
  ``1 - ((1 - kappa_{t'}) / (1 - kappa_t)) ** alpha_t``. For ``alpha_t = 1`` this is
  ``(kappa_{t'} - kappa_t) / (1 - kappa_t)``, which depends on the schedule only, so which positions move is decided
  before the logits are read (:meth:`plan_step`) and tokens are drawn only there.
* corrector (``corrector_alpha > 0``): ``u_bar = alpha_t * u_forward - beta_t * u_backward`` with
  ``alpha_t = 1 + corrector_alpha * t^a * (1 - t)^b`` and ``beta_t = alpha_t - 1``. The backward velocity
  ``kappa'_t / kappa_t * (delta_{X_t^i} - p_{0|t})`` sends a free position back to the source with probability
  ``1 - (kappa_t / kappa_{t'}) ** beta_t``: for the mask source it re-masks visible tokens; for the uniform source
  ``p_{0|t}(a | z) = kappa_t r + [a = z](1 - p_{1|t}(z) + (1 - kappa_t) r)`` with
  ``r = p_{1|t}(z) / (d kappa_t + 1 - kappa_t)`` (``d`` source tokens), so the jump goes to a uniform token with
  probability ``d kappa_t r``.
* the last step lands on ``t = 1``: every free position still holding a source token is resolved from ``p_{1|t}``.
* block-wise DFM (``block_length = L``, mask source): a row's generated positions are cut left to right into blocks of
  ``L``; the ``N`` steps are split over the blocks as in LLaDA (see
  :func:`~dfm_hf.schedulers.utils.block_windows`: the window of blocks opened at step ``s`` must be complete by step
  ``d``), and the window runs its own DFM flow from ``t = 0`` to ``t = 1`` on the local grid
  ``t_j = j / (d - s + 1)``, ``j = i - s``, while later blocks stay masked and earlier ones stay fixed. Each block is
  then drawn from the model's conditional given the blocks before it (exact in the limit for an exact posterior).

The mask token is never drawn as a value whatever the logits give it, conditioning positions never change, and
every draw of a step (the plan's uniform numbers, the categorical draws, the corrector's coins) and the probabilities
they are compared with are computed in ``sampling_dtype``: float64 by default (float32 Gumbel-max under-samples rare
tokens), float32 on a device without float64 (MPS; a warning says so once). The logit rows are read in chunks of at
most ``chunk_bytes`` per temporary, whatever the number of positions the step reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .. import paths, rng
from ..rng import GeneratorLike, check_generator
from .diffusers_convention import DiffusersConventionMixin, DiscreteSchedulerOutput
from .sampling import LogitRows, check_sampling_dtype, process_logits, sample_rows
from .utils import (
    BlockWindows,
    DFMSchedulerMixin,
    StepPlan,
    block_windows,
    check_windows,
    validate_block_length,
    validate_num_inference_steps,
    validate_sampling_args,
)

TIME_SPACINGS = ("uniform", "cosine")


@dataclass
class DiscreteFlowSchedulerOutput(BaseOutput):
    """Output of :meth:`DiscreteFlowScheduler.step`.

    Args:
        prev_sample: (batch, length) LongTensor, the state at the next time of the grid.
        pred_original_sample: (batch, length) LongTensor, an estimate of ``x1``: the tokens drawn from
            ``p_{1|t}`` where positions moved, the current state elsewhere.
    """

    prev_sample: torch.LongTensor
    pred_original_sample: Optional[torch.LongTensor] = None


class DiscreteFlowScheduler(DiffusersConventionMixin, DFMSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Discrete Flow Matching Euler sampler with kappa schedules, mask/uniform sources and the DFM corrector.

    Config:
        source_distribution: ``"mask"`` (needs ``mask_token_id``) or ``"uniform"`` (needs ``vocab_size``).
        mask_token_id: id of ``[MASK]``; never drawn as a value.
        vocab_size: number of logits per position (checked against ``model_output``).
        kappa_schedule: ``"polynomial"`` (``kappa_t = t ** kappa_exponent``) or ``"cosine"``
            (``kappa_t = 1 - cos^2(pi t / 2)``).
        kappa_exponent: exponent of the polynomial schedule (> 0).
        prediction_type: ``"sample"`` (logits of ``p_{1|t}``). ``"epsilon"`` (logits of ``p_{0|t}``) is a training
            target; it cannot drive this forward sampler (``p_{0|t}`` does not determine where a token jumps) and
            :meth:`set_timesteps` says so.
        corrector_alpha, corrector_a, corrector_b: ``alpha_t = 1 + corrector_alpha * t^a * (1-t)^b`` (0 = off).
        temperature, top_k, top_p: applied to ``p_{1|t}`` before each draw (defaults are exact sampling).
        sampling_dtype: ``"float64"`` (default) or ``"float32"``: the dtype of every draw and jump probability of a
            step (float32 where the device has no float64).
        time_spacing: ``"uniform"`` grid ``t_i = i / N``, or ``"cosine"`` (denser near both ends).
        block_length: None (one flow over every generated position) or ``L``: block-wise DFM (mask source only; module
            docstring).
    """

    order = 1
    _compatibles = ["ConfidenceUnmaskingScheduler"]

    @register_to_config
    def __init__(
        self,
        source_distribution: str = "mask",
        mask_token_id: Optional[int] = None,
        vocab_size: Optional[int] = None,
        kappa_schedule: str = "polynomial",
        kappa_exponent: float = 1.0,
        prediction_type: str = "sample",
        corrector_alpha: float = 0.0,
        corrector_a: float = 2.0,
        corrector_b: float = 0.25,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        sampling_dtype: str = "float64",
        time_spacing: str = "uniform",
        block_length: Optional[int] = None,
    ) -> None:
        paths.validate_source(source_distribution, mask_token_id, vocab_size)
        self.schedule = paths.get_kappa_schedule(kappa_schedule, kappa_exponent)
        if prediction_type not in paths.PREDICTION_TYPES:
            raise ValueError(
                f"`prediction_type` must be one of {list(paths.PREDICTION_TYPES)}, got {prediction_type!r}."
            )
        for name, value in (("corrector_alpha", corrector_alpha), ("corrector_a", corrector_a)):
            if not _is_real(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if not _is_real(corrector_b) or corrector_b < 0:
            raise ValueError(f"`corrector_b` must be a finite number >= 0, got {corrector_b!r}.")
        validate_sampling_args(temperature, top_k, top_p)
        check_sampling_dtype(sampling_dtype)
        if time_spacing not in TIME_SPACINGS:
            raise ValueError(f"`time_spacing` must be one of {list(TIME_SPACINGS)}, got {time_spacing!r}.")
        validate_block_length(block_length)
        if block_length is not None and source_distribution != "mask":
            raise ValueError(
                "`block_length` needs `source_distribution`='mask' (later blocks wait masked), "
                f"got {source_distribution!r}."
            )
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._times: list[float] = []
        self._step_index: Optional[int] = None

    # ------------------------------------------------------------------ time grid
    def set_timesteps(
        self,
        num_inference_steps: int,
        device: Union[str, torch.device, None] = None,
        block_length: Optional[int] = None,
    ) -> None:
        """Set the grid: ``timesteps`` holds the N increasing times in [0, 1) where the model is evaluated.
        ``block_length``: diffusers' per-block calling form (:mod:`~dfm_hf.schedulers.diffusers_convention`).
        """
        if self.config.prediction_type == "epsilon":
            raise ValueError(
                "`prediction_type`='epsilon' cannot drive DiscreteFlowScheduler: the forward velocity needs "
                "p_{1|t}; p_{0|t} only gives the backward (corrector) term. Train with prediction_type='sample'."
            )
        validate_num_inference_steps(num_inference_steps)
        self._set_block_form(block_length)  # diffusers' per-block form (diffusers_convention)
        grid = [i / num_inference_steps for i in range(num_inference_steps + 1)]
        if self.config.time_spacing == "cosine":
            grid = [0.5 - 0.5 * math.cos(math.pi * s) for s in grid]
        self._times = grid
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(grid[:-1], dtype=torch.float32, device=device)
        self._step_index = None

    # ------------------------------------------------------------------ helpers
    def _jump_probabilities(
        self, t: torch.Tensor, t_next: torch.Tensor, last: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kappa_t, p_fwd, p_bwd)`` of a step from ``t`` to ``t_next`` (tensors of any shape, in the dtype they are
        computed in; ``last`` marks steps that land on 1): ``alpha_t = 1 + corrector_alpha t^a (1 - t)^b``,
        ``beta_t = alpha_t - 1`` (0 on the last step), ``p_fwd = 1 - ((1 - kappa_{t'}) / (1 - kappa_t))^alpha_t`` (1 on
        the last step) and ``p_bwd = 1 - (kappa_t / kappa_{t'})^beta_t``."""
        c = self.config
        k, k_next = self.schedule.kappa(t, dtype=t.dtype), self.schedule.kappa(t_next, dtype=t.dtype)
        alpha = torch.ones_like(t)
        if c.corrector_alpha != 0:
            alpha = 1.0 + c.corrector_alpha * t**c.corrector_a * (1.0 - t) ** c.corrector_b
        beta = torch.where(last, torch.zeros_like(alpha), alpha - 1.0)
        p_fwd = torch.where(last | (k >= 1.0), torch.ones_like(k), 1.0 - ((1.0 - k_next) / (1.0 - k)) ** alpha)
        p_bwd = torch.where((beta == 0) | (k <= 0.0), torch.zeros_like(k), 1.0 - (k / k_next) ** beta)
        return k, p_fwd, p_bwd

    @property
    def _source_size(self) -> int:
        c = self.config
        return c.vocab_size - (c.mask_token_id is not None)

    def plan_step(
        self,
        sample: torch.LongTensor,
        timestep: Union[float, torch.Tensor],
        generator: GeneratorLike = None,
        condition_mask: Optional[torch.Tensor] = None,
        windows: Optional[BlockWindows] = None,
    ) -> StepPlan:
        """Decide which positions move in this step, from the schedule alone, and return the :class:`StepPlan`.

        ``plan.positions`` is where the step reads logits: a caller can run the model (or just its LM head) only
        there, skip the model entirely when it is nowhere True, and pass ``plan=`` to :meth:`step`. Each free position
        reads one uniform number ``u`` here (row-major; per row with a list of generators): mask source,
        ``forward = masked & (u < p_fwd)``, ``backward = visible & (u < p_bwd)``; uniform source,
        ``forward = u < p_fwd``, ``backward = ~forward & (u < p_fwd + (1 - p_fwd) p_bwd)``.

        ``windows``: the open windows decided by the caller (a :class:`~dfm_hf.schedulers.utils.BlockWindows` from
        :func:`~dfm_hf.schedulers.utils.block_grid_windows`: the block grid of a block-diffusion model; mask source
        only); each window runs its own flow, as with ``block_length``. None: no blocks, or ``block_length``'s split.
        """
        self._check_sample(sample, condition_mask)
        check_generator(generator, sample.shape[0])
        check_windows(windows, sample)
        i = self._index_for(timestep)
        c = self.config
        if windows is not None and c.source_distribution != "mask":
            raise ValueError(
                "`windows` need `source_distribution`='mask' (later blocks wait masked), "
                f"got {c.source_distribution!r}."
            )
        dtype = self._step_dtype(sample.device)
        if c.block_length is not None or windows is not None:
            return self._plan_blocks(sample, i, generator, condition_mask, windows, dtype)
        t, t_next = (torch.tensor(v, dtype=dtype) for v in self._times[i : i + 2])
        k, p_fwd, p_bwd = self._jump_probabilities(t, t_next, torch.tensor(i == self.num_inference_steps - 1))
        p_fwd, p_bwd = p_fwd.to(sample.device), p_bwd.to(sample.device)
        free = torch.ones_like(sample, dtype=torch.bool) if condition_mask is None else ~condition_mask.bool()
        u = rng.rand_at(free, generator, dtype=dtype).squeeze(-1)
        if c.source_distribution == "mask":
            masked = sample == c.mask_token_id
            forward = free & masked & (u < p_fwd)
            backward = free & ~masked & (u < p_bwd)
            needs = forward
        else:
            forward = free & (u < p_fwd)
            backward = free & ~forward & (u < p_fwd + (1.0 - p_fwd) * p_bwd)
            needs = forward | backward
        timesteps = torch.full((sample.shape[0],), float(t), dtype=torch.float32, device=sample.device)
        return StepPlan(
            step_index=i,
            positions=needs,
            counts=rng.row_counts(needs),
            forward=forward,
            backward=backward,
            kappa=float(k),
            timesteps=timesteps,
        )

    def _spaced(self, s: torch.Tensor) -> torch.Tensor:
        """The grid spacing applied to uniform local times ``s`` in [0, 1]."""
        return 0.5 - 0.5 * torch.cos(math.pi * s) if self.config.time_spacing == "cosine" else s

    def _plan_blocks(
        self,
        sample: torch.Tensor,
        i: int,
        generator: GeneratorLike,
        condition_mask: Optional[torch.Tensor],
        windows: Optional[BlockWindows],
        dtype: torch.dtype,
    ) -> StepPlan:
        """:meth:`plan_step` of block-wise DFM: the open window's own flow, at per-row local times (in ``dtype``)."""
        c = self.config
        free = torch.ones_like(sample, dtype=torch.bool) if condition_mask is None else ~condition_mask.bool()
        blocks = windows if windows is not None else block_windows(free, c.block_length, i, self.num_inference_steps)
        span = (blocks.last_step - blocks.first_step + 1).to(dtype)
        local = (i - blocks.first_step).to(dtype)
        t, t_next = self._spaced(local / span), self._spaced((local + 1) / span)
        k, p_fwd, p_bwd = self._jump_probabilities(t, t_next, blocks.last_step == i)
        u = rng.rand_at(blocks.window, generator, dtype=dtype).squeeze(-1)
        masked = sample == c.mask_token_id
        forward = blocks.window & masked & (u < p_fwd.unsqueeze(1))
        backward = blocks.window & ~masked & (u < p_bwd.unsqueeze(1))
        return StepPlan(
            step_index=i,
            positions=forward,
            counts=rng.row_counts(forward),
            forward=forward,
            backward=backward,
            kappa=k,
            window=blocks.window,
            window_index=blocks.num_open,
            timesteps=t.to(torch.float32),
        )

    # ------------------------------------------------------------------ step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.LongTensor,
        generator: GeneratorLike = None,
        return_dict: bool = True,
        condition_mask: Optional[torch.Tensor] = None,
        plan: Optional[StepPlan] = None,
        **options: Any,
    ) -> Union[DiscreteFlowSchedulerOutput, DiscreteSchedulerOutput, tuple]:
        """Advance ``sample`` from ``timestep`` to the next time of the grid.

        ``model_output`` is (batch, length, vocab) logits of ``p_{1|t}``, or the packed (K, vocab) rows at
        ``plan.positions``. With ``plan=`` (from :meth:`plan_step` on this ``sample`` and ``timestep``) the step applies
        exactly that plan; without it, it plans itself first (drawing the plan's numbers from ``generator``).
        Forward positions take a draw ``x1 ~ p_{1|t}`` (after temperature / top-k / top-p; exact inverse-CDF in
        ``sampling_dtype``); backward ones go back to the source (see the module docstring).

        A call with diffusers' ``options`` (``mask_token_id=``, ``temperature=``, ...; an ``int`` step index) runs
        :meth:`diffusers_step` (:mod:`~dfm_hf.schedulers.diffusers_convention`).
        """
        if self._is_diffusers_call(timestep, condition_mask, plan, options):  # diffusers' form (diffusers_convention)
            return self.diffusers_step(model_output, timestep, sample, generator, return_dict, **options)
        plan = self._plan_for_step(plan, sample, timestep, generator, condition_mask)
        c = self.config
        dtype = self._step_dtype(sample.device)
        new = sample.clone()
        rows = LogitRows(model_output, plan.positions, c.vocab_size, plan.counts)
        if c.source_distribution == "mask":
            # mask source: the positions that read logits are exactly the forward jumps; sample them chunk by chunk
            new[plan.forward] = sample_rows(
                rows, generator, **self._filters(), dtype=dtype, chunk_bytes=self.chunk_bytes
            )
            x1_hat = new.clone() if return_dict else None
            new[plan.backward] = c.mask_token_id
        else:
            new = self._uniform_update(new, plan, rows, generator, dtype)
            x1_hat = None
        self._step_index = plan.step_index + 1
        if not return_dict:
            return (new,)
        return DiscreteFlowSchedulerOutput(prev_sample=new, pred_original_sample=x1_hat if x1_hat is not None else new)

    def _filters(self) -> dict:
        """The logit processing of a draw: temperature, top-k, top-p, the mask token forbidden."""
        c = self.config
        return dict(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, forbidden_token_id=c.mask_token_id)

    def _uniform_update(
        self, new: torch.Tensor, plan: StepPlan, rows: LogitRows, generator: GeneratorLike, dtype: torch.dtype
    ) -> torch.Tensor:
        """Uniform source: forward positions take a draw from p_{1|t}; backward candidates move to a uniform token
        with probability ``d kappa_t r``, ``r = p_{1|t}(z) / (d kappa_t + 1 - kappa_t)``. Both read the logit rows in
        chunks (``chunk_bytes``)."""
        c = self.config
        fwd_rows = plan.forward[plan.positions]
        forward = rows.select(fwd_rows, plan.forward, rng.row_counts(plan.forward))
        new[plan.forward] = sample_rows(
            forward, generator, **self._filters(), dtype=dtype, chunk_bytes=self.chunk_bytes
        )
        backward_counts = rng.row_counts(plan.backward)
        if not any(backward_counts):
            return new
        current = new[plan.backward]
        backward = rows.select(~fwd_rows, plan.backward, backward_counts)
        p1_z = torch.empty(backward.count, dtype=dtype, device=new.device)
        for start, stop, chunk in backward.chunks(dtype, self.chunk_bytes):
            log_probs = process_logits(chunk, dtype=dtype, **self._filters())
            p1_z[start:stop] = log_probs.gather(1, current[start:stop].unsqueeze(1)).squeeze(1).exp()
        d, k = self._source_size, plan.kappa
        accept_p = d * k * p1_z / (d * k + 1.0 - k)
        coins = torch.zeros_like(new, dtype=dtype)
        coins[plan.backward] = 1.0 - accept_p  # draws below this threshold are rejected
        u = rng.rand_at(plan.backward, generator, dtype=dtype, counts=backward_counts).squeeze(-1)
        accepted = plan.backward & (u >= coins)
        tokens = rng.uniform_tokens_at(rng.row_counts(accepted), c.vocab_size, c.mask_token_id, generator, new.device)
        new[accepted] = tokens.to(new.dtype)
        return new

    # ------------------------------------------------------------------ training
    def add_noise(
        self,
        original_samples: torch.LongTensor,
        noise: torch.LongTensor,
        timesteps: Union[float, torch.Tensor],
        generator: Optional[torch.Generator] = None,
        condition_mask: Optional[torch.Tensor] = None,
    ) -> torch.LongTensor:
        """``x_t = where(u < kappa_t, x1, x0)`` per token (mixture path), ``noise`` being a source sample ``x0``; ``u``
        and ``kappa_t`` in ``sampling_dtype``."""
        dtype = self._step_dtype(original_samples.device)
        return paths.sample_path(
            original_samples, noise, timesteps, self.schedule, generator, condition_mask, dtype=dtype
        )

    def sample_source(self, shape_like: torch.LongTensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A source sample ``x0`` shaped like ``shape_like`` (all mask tokens, or uniform tokens never the mask)."""
        c = self.config
        return paths.sample_source(shape_like, c.source_distribution, c.mask_token_id, c.vocab_size, generator)

    def __len__(self) -> int:
        return self.num_inference_steps or 0


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
