"""`ConfidenceUnmaskingScheduler`: confidence-ordered unmasking (MaskGIT / LLaDA low-confidence remasking).

The baseline the DFM paper compares against, with the same pipeline contract as `DiscreteFlowScheduler`
(`set_timesteps`, `plan_step`, `step`). At step ``i`` of ``N`` a row with ``m`` masked free positions commits
``k = ceil(m / (N - i))`` of them (LLaDA's even split of the remaining tokens over the remaining steps): a token
``x^j ~ p_{1|t}`` (after temperature / top-k / top-p) is drawn at every masked position, and the ``k`` positions with
the highest confidence ``p_{1|t}(x^j)`` (or a random order with ``remasking="random"``) keep it; the others stay
masked. It is not a sampler of the model's distribution in the limit: it is the greedy-ordering heuristic.

With ``block_length = L`` (LLaDA's semi-autoregressive blocks) a row's generated (non-conditioning) positions are cut,
left to right, into ``B = ceil(free / L)`` blocks and only the open blocks are ranked and read: after step ``i`` the
first ``w_i = ceil((i + 1) B / N)`` blocks are open and must be complete by step ``floor(w_i N / B) - 1``, so step
``i`` commits ``k = ceil(m_w / (floor(w_i N / B) - i))`` of the ``m_w`` masked positions of the open blocks. With
``N`` a multiple of ``B`` each block gets ``N / B`` steps (LLaDA's schedule); the last step commits every block.
"""

from __future__ import annotations

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
)
from .utils import OurSchedulerMixin, validate_sampling_args

REMASKING = ("low_confidence", "random")


@dataclass
class ConfidenceUnmaskingSchedulerOutput(BaseOutput):
    """Output of :meth:`ConfidenceUnmaskingScheduler.step`: ``prev_sample`` and the drawn ``pred_original_sample``."""

    prev_sample: torch.LongTensor
    pred_original_sample: Optional[torch.LongTensor] = None


class ConfidenceUnmaskingScheduler(OurSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Confidence-ordered unmasking for the mask source (MaskGIT / LLaDA low-confidence remasking).

    Config: ``mask_token_id`` (required), ``vocab_size``, ``remasking`` (``"low_confidence"`` | ``"random"``),
    ``temperature`` (0 = greedy, LLaDA's default), ``top_k``, ``top_p``, ``sampling_dtype``, ``block_length``
    (None: rank every masked position; an integer: semi-autoregressive blocks, see the module docstring).
    """

    order = 1
    _compatibles = ["DiscreteFlowScheduler"]

    @register_to_config
    def __init__(
        self,
        mask_token_id: Optional[int] = None,
        vocab_size: Optional[int] = None,
        remasking: str = "low_confidence",
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        sampling_dtype: str = "float64",
        source_distribution: str = "mask",
        block_length: Optional[int] = None,
    ) -> None:
        if source_distribution != "mask":
            raise ValueError(
                f"`source_distribution` must be 'mask' for confidence unmasking, got {source_distribution!r}."
            )
        paths.validate_source("mask", mask_token_id, vocab_size)
        if remasking not in REMASKING:
            raise ValueError(f"`remasking` must be one of {list(REMASKING)}, got {remasking!r}.")
        validate_sampling_args(temperature, top_k, top_p)
        if sampling_dtype not in SAMPLING_DTYPES:
            raise ValueError(f"`sampling_dtype` must be one of {list(SAMPLING_DTYPES)}, got {sampling_dtype!r}.")
        if block_length is not None and (
            isinstance(block_length, bool) or not isinstance(block_length, int) or not 1 <= block_length <= 1_000_000
        ):
            raise ValueError(f"`block_length` must be None or an integer in [1, 1000000], got {block_length!r}.")
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._times: list[float] = []
        self._step_index: Optional[int] = None

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """Uniform grid ``t_i = i / N``; step ``i`` commits ``ceil(masked / (N - i))`` tokens per row."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if not 1 <= num_inference_steps <= 1_000_000:
            raise ValueError(f"`num_inference_steps` must lie in [1, 1000000], got {num_inference_steps}.")
        self._times = [i / num_inference_steps for i in range(num_inference_steps + 1)]
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(self._times[:-1], dtype=torch.float32, device=device)
        self._step_index = None

    def plan_step(
        self,
        sample: torch.LongTensor,
        timestep: Union[float, torch.Tensor],
        generator: GeneratorLike = None,
        condition_mask: Optional[torch.Tensor] = None,
    ) -> torch.BoolTensor:
        """Positions whose logits the step reads: every masked non-conditioning position (of the open blocks)."""
        return self._plan(sample, timestep, generator, condition_mask)[0]

    def _plan(
        self,
        sample: torch.LongTensor,
        timestep: Union[float, torch.Tensor],
        generator: GeneratorLike,
        condition_mask: Optional[torch.Tensor],
    ) -> tuple[torch.BoolTensor, Union[int, torch.LongTensor], int]:
        """``(needs, steps_left, i)``: positions to rank, the steps left (per row with blocks) to commit all of them,
        and the grid index of ``timestep``."""
        self._check_sample(sample, condition_mask)
        check_generator(generator, sample.shape[0])
        i = self._index_for(timestep)
        n = self.num_inference_steps
        free = torch.ones_like(sample, dtype=torch.bool) if condition_mask is None else ~condition_mask.bool()
        needs = (sample == self.config.mask_token_id) & free
        length = self.config.block_length
        if length is None:
            return needs, n - i, i
        block = (free.cumsum(1) - 1) // length  # block index of each free position, counted from the left
        blocks = (free.sum(1) + length - 1) // length
        open_blocks = ((i + 1) * blocks + n - 1) // n
        steps_left = torch.where(blocks > 0, open_blocks * n // blocks.clamp(min=1) - i, 1)
        return needs & (block < open_blocks.unsqueeze(1)), steps_left, i

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.LongTensor,
        generator: GeneratorLike = None,
        return_dict: bool = True,
        condition_mask: Optional[torch.Tensor] = None,
    ) -> Union[ConfidenceUnmaskingSchedulerOutput, tuple]:
        """Commit the ``k`` most confident draws per row; ``model_output`` is full or packed logits (see plan_step)."""
        c = self.config
        needs, steps_left, i = self._plan(sample, timestep, generator, condition_mask)
        rows = rows_of(model_output, needs, c.vocab_size)
        dtype = SAMPLING_DTYPES[c.sampling_dtype]
        multi = isinstance(generator, (list, tuple))
        if c.temperature == 0 and c.remasking == "low_confidence":
            # greedy (LLaDA's default): the arg-max and its log-probability log p = x[token] - logsumexp(x), from one
            # converted copy of the rows (no one-hot distribution is built)
            x = process_logits(rows, 1.0, None, None, c.mask_token_id, dtype, normalize=False)
            tokens = x.argmax(-1)
            conf_values = x.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(x, dim=-1)
        else:
            plain = process_logits(rows, 1.0, None, None, c.mask_token_id, dtype)  # confidence: the model's p_{1|t}
            exact = c.temperature == 1.0 and c.top_k is None and c.top_p is None
            log_probs = (
                plain if exact else process_logits(rows, c.temperature, c.top_k, c.top_p, c.mask_token_id, dtype)
            )
            tokens = draw_categorical(log_probs, needs.sum(1).tolist() if multi else None, generator)
            if c.remasking == "low_confidence":
                conf_values = plain.gather(1, tokens.unsqueeze(1)).squeeze(1)
            else:
                conf_values = rand_at(needs, generator, dtype=dtype).squeeze(-1)[needs]
        conf = torch.full(sample.shape, -float("inf"), dtype=dtype, device=sample.device)
        conf[needs] = conf_values
        k = (needs.sum(1) + steps_left - 1) // steps_left
        order = conf.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(
            1, order, torch.arange(sample.shape[1], device=sample.device).expand_as(order)
        )
        commit = needs & (ranks < k.unsqueeze(1))
        drawn = sample.clone()
        drawn[needs] = tokens
        new = torch.where(commit, drawn, sample)
        self._step_index = i + 1
        if not return_dict:
            return (new,)
        return ConfidenceUnmaskingSchedulerOutput(prev_sample=new, pred_original_sample=drawn)

    def add_noise(
        self,
        original_samples: torch.LongTensor,
        noise: torch.LongTensor,
        timesteps: Union[float, torch.Tensor],
        generator: Optional[torch.Generator] = None,
        condition_mask: Optional[torch.Tensor] = None,
    ) -> torch.LongTensor:
        """Linear mixture path ``x_t = where(u < t, x1, x0)`` (MaskGIT/LLaDA train with a linear masking rate)."""
        return paths.sample_path(
            original_samples, noise, timesteps, paths.PolynomialKappa(1.0), generator, condition_mask
        )

    def __len__(self) -> int:
        return self.num_inference_steps or 0
