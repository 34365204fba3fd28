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

The mask token is never drawn as a value whatever the logits give it, conditioning positions never change, and
categorical draws are made in float64 by default (float32 Gumbel-max under-samples rare tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .. import paths
from .sampling import (
    SAMPLING_DTYPES,
    GeneratorLike,
    check_generator,
    draw_categorical,
    process_logits,
    rand_at,
    rows_of,
    sample_rows,
)
from .utils import OurSchedulerMixin, validate_sampling_args

PREDICTION_TYPES = ("sample", "epsilon")
MAX_INFERENCE_STEPS = 1_000_000


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


@dataclass
class _Plan:
    step_index: int
    forward: torch.Tensor  # positions that jump to a draw from p_{1|t}
    backward: torch.Tensor  # positions sent back towards the source
    needs_logits: torch.Tensor
    kappa: float
    sample: torch.Tensor


class DiscreteFlowScheduler(OurSchedulerMixin, SchedulerMixin, ConfigMixin):
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
        sampling_dtype: ``"float64"`` (default) or ``"float32"`` for the categorical draws.
        time_spacing: ``"uniform"`` grid ``t_i = i / N``, or ``"cosine"`` (denser near both ends).
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
    ) -> None:
        paths.validate_source(source_distribution, mask_token_id, vocab_size)
        self.schedule = paths.get_kappa_schedule(kappa_schedule, kappa_exponent)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")
        for name, value in (("corrector_alpha", corrector_alpha), ("corrector_a", corrector_a)):
            if not _is_real(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if not _is_real(corrector_b) or corrector_b < 0:
            raise ValueError(f"`corrector_b` must be a finite number >= 0, got {corrector_b!r}.")
        validate_sampling_args(temperature, top_k, top_p)
        if sampling_dtype not in SAMPLING_DTYPES:
            raise ValueError(f"`sampling_dtype` must be one of {list(SAMPLING_DTYPES)}, got {sampling_dtype!r}.")
        if time_spacing not in ("uniform", "cosine"):
            raise ValueError(f"`time_spacing` must be one of ['uniform', 'cosine'], got {time_spacing!r}.")
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._times: list[float] = []
        self._step_index: Optional[int] = None
        self._plan: Optional[_Plan] = None

    # ------------------------------------------------------------------ time grid
    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """Set the grid: ``timesteps`` holds the N increasing times in [0, 1) where the model is evaluated."""
        if self.config.prediction_type == "epsilon":
            raise ValueError(
                "`prediction_type`='epsilon' cannot drive DiscreteFlowScheduler: the forward velocity needs "
                "p_{1|t}; p_{0|t} only gives the backward (corrector) term. Train with prediction_type='sample'."
            )
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if not 1 <= num_inference_steps <= MAX_INFERENCE_STEPS:
            raise ValueError(
                f"`num_inference_steps` must lie in [1, {MAX_INFERENCE_STEPS}], got {num_inference_steps}."
            )
        grid = [i / num_inference_steps for i in range(num_inference_steps + 1)]
        if self.config.time_spacing == "cosine":
            grid = [0.5 - 0.5 * math.cos(math.pi * s) for s in grid]
        self._times = grid
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(grid[:-1], dtype=torch.float32, device=device)
        self._step_index = None
        self._plan = None

    # ------------------------------------------------------------------ helpers
    def _alpha(self, t: float) -> float:
        c = self.config
        if c.corrector_alpha == 0:
            return 1.0
        return 1.0 + c.corrector_alpha * (t**c.corrector_a) * ((1.0 - t) ** c.corrector_b)

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
    ) -> torch.BoolTensor:
        """Decide which positions move in this step, from the schedule alone, and return where logits are read.

        The decision is kept for the following :meth:`step` at the same time, so a caller can run the model (or
        just its LM head) only at the returned positions and skip the model entirely when none is True.
        """
        self._check_sample(sample, condition_mask)
        check_generator(generator, sample.shape[0])
        i = self._index_for(timestep)
        c = self.config
        t, t_next = self._times[i], self._times[i + 1]
        last = i == self.num_inference_steps - 1
        k, k_next = (float(v) for v in self.schedule.kappa(torch.tensor([t, t_next], dtype=torch.float64)))
        alpha = self._alpha(t)
        beta = 0.0 if last else alpha - 1.0
        p_fwd = 1.0 if (last or k >= 1.0) else 1.0 - ((1.0 - k_next) / (1.0 - k)) ** alpha
        p_bwd = 0.0 if (beta == 0.0 or k <= 0.0) else 1.0 - (k / k_next) ** beta
        free = torch.ones_like(sample, dtype=torch.bool) if condition_mask is None else ~condition_mask.bool()
        u = rand_at(free, generator).squeeze(-1)
        if c.source_distribution == "mask":
            masked = sample == c.mask_token_id
            forward = free & masked & (u < p_fwd)
            backward = free & ~masked & (u < p_bwd)
            needs = forward
        else:
            forward = free & (u < p_fwd)
            backward = free & ~forward & (u < p_fwd + (1.0 - p_fwd) * p_bwd)
            needs = forward | backward
        self._plan = _Plan(i, forward, backward, needs, k, sample)
        return needs

    # ------------------------------------------------------------------ step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.LongTensor,
        generator: GeneratorLike = None,
        return_dict: bool = True,
        condition_mask: Optional[torch.Tensor] = None,
    ) -> Union[DiscreteFlowSchedulerOutput, tuple]:
        """Advance ``sample`` from ``timestep`` to the next time of the grid.

        ``model_output`` is (batch, length, vocab) logits of ``p_{1|t}``, or the packed (K, vocab) rows at the
        positions :meth:`plan_step` returned. Without a prior :meth:`plan_step` at this time, the step plans itself.
        """
        plan = self._plan
        if plan is None or plan.sample is not sample or plan.step_index != self._index_for(timestep):
            self.plan_step(sample, timestep, generator, condition_mask)
            plan = self._plan
        self._plan = None
        c = self.config
        dtype = SAMPLING_DTYPES[c.sampling_dtype]
        new = sample.clone()
        if c.source_distribution == "mask":
            # mask source: the positions that read logits are exactly the forward jumps; sample them chunk by chunk
            new[plan.forward] = sample_rows(
                model_output,
                plan.forward,
                c.vocab_size,
                generator,
                temperature=c.temperature,
                top_k=c.top_k,
                top_p=c.top_p,
                forbidden_token_id=c.mask_token_id,
                dtype=dtype,
            )
            x1_hat = new.clone() if return_dict else None
            new[plan.backward] = c.mask_token_id
        else:
            rows = rows_of(model_output, plan.needs_logits, c.vocab_size)
            log_probs = process_logits(rows, c.temperature, c.top_k, c.top_p, c.mask_token_id, dtype)
            new = self._uniform_update(new, plan, log_probs, generator)
            x1_hat = None
        self._step_index = plan.step_index + 1
        if not return_dict:
            return (new,)
        return DiscreteFlowSchedulerOutput(prev_sample=new, pred_original_sample=x1_hat if x1_hat is not None else new)

    def _uniform_update(
        self, new: torch.Tensor, plan: _Plan, log_probs: torch.Tensor, generator: GeneratorLike
    ) -> torch.Tensor:
        """Uniform source: forward positions take a draw from p_{1|t}; backward candidates move to a uniform token
        with probability ``d kappa_t r``, ``r = p_{1|t}(z) / (d kappa_t + 1 - kappa_t)``."""
        c = self.config
        multi = isinstance(generator, (list, tuple))
        fwd_rows = plan.forward[plan.needs_logits]
        counts = plan.forward.sum(1).tolist() if multi else None
        new[plan.forward] = draw_categorical(log_probs[fwd_rows], counts, generator)
        if not bool(plan.backward.any()):
            return new
        current = new[plan.backward]
        p1_z = log_probs[~fwd_rows].gather(1, current.unsqueeze(1)).squeeze(1).exp()
        d, k = self._source_size, plan.kappa
        accept_p = d * k * p1_z / (d * k + 1.0 - k)
        coins = torch.zeros_like(new, dtype=log_probs.dtype)
        coins[plan.backward] = 1.0 - accept_p  # draws below this threshold are rejected
        u = rand_at(plan.backward, generator, dtype=log_probs.dtype).squeeze(-1)
        accepted = plan.backward & (u >= coins)
        if not multi:
            tokens = paths.sample_uniform_tokens(
                (int(accepted.sum()),), c.vocab_size, c.mask_token_id, generator, new.device
            )
        else:
            tokens = torch.cat(
                [
                    paths.sample_uniform_tokens((int(accepted[b].sum()),), c.vocab_size, c.mask_token_id, g, new.device)
                    for b, g in enumerate(generator)
                ]
            )
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
        """``x_t = where(u < kappa_t, x1, x0)`` per token (mixture path), ``noise`` being a source sample ``x0``."""
        return paths.sample_path(original_samples, noise, timesteps, self.schedule, generator, condition_mask)

    def sample_source(self, shape_like: torch.LongTensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A source sample ``x0`` shaped like ``shape_like`` (all mask tokens, or uniform tokens never the mask)."""
        c = self.config
        return paths.sample_source(shape_like, c.source_distribution, c.mask_token_id, c.vocab_size, generator)

    def __len__(self) -> int:
        return self.num_inference_steps or 0


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
