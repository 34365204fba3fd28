"""`ConfidenceUnmaskingScheduler`: confidence-ordered unmasking (MaskGIT / LLaDA low-confidence remasking, Dream's
confidence samplers, Fast-dLLM's threshold parallel decoding).

The baseline the DFM paper compares against, with the same pipeline contract as `DiscreteFlowScheduler`
(`set_timesteps`, `plan_step` -> `StepPlan`, `step(..., plan=)`). At step ``i`` of ``N`` a row with ``m`` masked free
positions commits ``k = ceil(m / (N - i))`` of them (LLaDA's even split of the remaining tokens over the remaining
steps): a token ``x^j ~ p_{1|t}`` (after temperature / top-k / top-p; the arg-max at temperature 0) is drawn at every
masked position, and the ``k`` positions with the highest confidence keep it; the others stay masked. Confidence is
computed on the model's ``p = p_{1|t}`` itself (temperature 1, no filtering; the mask token excluded):

* ``confidence="probability"``: ``p(x^j)`` of the drawn token (LLaDA's ``low_confidence``, Dream's ``maskgit_plus``);
* ``"margin"``: ``p_(1) - p_(2)``, the top probability minus the second (Dream's ``topk_margin``);
* ``"entropy"``: ``sum_v p(v) log p(v)``, the negative entropy (Dream's ``entropy``).

``remasking="random"`` ranks in a random order instead. It is not a sampler of the model's distribution in the
limit: it is the greedy-ordering heuristic.

With ``block_length = L`` (LLaDA's semi-autoregressive blocks) a row's generated (non-conditioning) positions are cut,
left to right, into ``B = ceil(free / L)`` blocks and only the open window of blocks is ranked and read: after step
``i`` the first ``w_i = ceil((i + 1) B / N)`` blocks are open and must be complete by step ``floor(w_i N / B) - 1``, so
step ``i`` commits ``k = ceil(m_w / (floor(w_i N / B) - i))`` of the ``m_w`` masked positions of the window (see
:func:`~dfm_hf.schedulers.utils.block_windows`). With ``N`` a multiple of ``B`` each block gets ``N / B`` steps
(LLaDA's schedule); the last step commits every block.

``transfer_schedule`` (``"even"``, ``"fixed"``, ``"dream"``) says how many positions a step commits and
``threshold_rule`` (``"schedule"``, ``"top1"``) what a threshold is added to: :mod:`~dfm_hf.schedulers.transfer`.

``rank_on_processed=True`` computes the confidence on the distribution the tokens are drawn from, as Dream does:
``q = softmax(filter(logits / T))`` after temperature ``T`` (no division at temperature 0, where the token is the
arg-max) and top-k / top-p, the mask token excluded; the three confidences above then read ``q`` instead of ``p``,
and exact ties (``q = 1`` wherever top-p keeps a single token) are decided by ``torch.topk`` over the row, as Dream's
selection decides them (otherwise the lowest position wins). Two differences from Dream remain: Dream's ``q`` keeps
the mask token (a model that gives it weight may draw it, and the position stays masked), and with both top-k and
top-p Dream filters by top-p first.

``alg_temp = a > 0`` (Dream's randomised ranking) draws the ``k`` committed positions at random instead of taking
the ``k`` most confident: one after another, without replacement, with probabilities ``softmax(c / a)`` over the
ranked positions of the row, ``c`` the confidence on Dream's scale (the probability itself for ``"probability"``).
It is done as a Gumbel top-k: the ``k`` largest ``c / a + G`` with ``G = -log(-log u)``, one uniform ``u`` per
ranked position, which has exactly that distribution. ``None`` or 0: the ``k`` most confident.

With ``confidence_threshold = tau`` (Fast-dLLM's parallel decoding) a step commits every ranked position whose
confidence exceeds ``tau`` as well as the ``k`` most confident ones (so at least the most confident one, and at least
what the schedule needs to finish within ``N`` steps): blocks fill faster, the steps left with nothing to commit read
no logits (the pipeline runs no model there), and ``num_inference_steps`` becomes an upper bound on the model calls.
For ``"probability"`` the threshold is a probability; for ``"margin"`` a probability gap; for ``"entropy"`` a
negative entropy (<= 0).

``sub_block_length`` and ``autoregressive_first_token`` give Fast-dLLM v2's order inside a block, its first position
alone (autoregressive for a ``logits_shift`` model), then sub-blocks left to right (:func:`~.utils.block_order`).
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
from ..rng import GeneratorLike, check_generator, draw_rows
from .diffusers_convention import DiffusersConventionMixin, DiscreteSchedulerOutput
from .editing import TokenEditor, validate_editing
from .sampling import LogitRows, check_sampling_dtype, greedy_with_log_probability, inverse_cdf, process_logits
from .transfer import commit_counts, dream_grid, top1_steps, validate_dream_options, validate_transfer
from .utils import (
    BlockWindows,
    DFMSchedulerMixin,
    StepPlan,
    block_order,
    block_windows,
    check_windows,
    validate_block_length,
    validate_block_order,
    validate_num_inference_steps,
    validate_sampling_args,
)

REMASKING = ("low_confidence", "random")
CONFIDENCES = ("probability", "margin", "entropy")


@dataclass
class ConfidenceUnmaskingSchedulerOutput(BaseOutput):
    """Output of :meth:`ConfidenceUnmaskingScheduler.step`: ``prev_sample`` and the drawn ``pred_original_sample``."""

    prev_sample: torch.LongTensor
    pred_original_sample: Optional[torch.LongTensor] = None


class ConfidenceUnmaskingScheduler(DiffusersConventionMixin, DFMSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Confidence-ordered unmasking for the mask source (MaskGIT / LLaDA / Dream / Fast-dLLM; module docstring).

    Config: ``mask_token_id`` (required), ``vocab_size``, ``remasking`` (``"low_confidence"`` | ``"random"``),
    ``confidence`` (``"probability"`` | ``"margin"`` | ``"entropy"``), ``temperature`` (0 = greedy, LLaDA's default),
    ``top_k``, ``top_p``, ``sampling_dtype``, ``block_length`` (None: rank every masked position; an integer:
    semi-autoregressive blocks), ``confidence_threshold`` (None: the fixed schedule; a number: also commit every
    position whose confidence exceeds it), ``transfer_schedule`` (``"even"`` | ``"fixed"`` | ``"dream"`` | None: how
    many positions a step commits; module docstring), ``transfer_eps`` (Dream's ``eps`` of the ``"dream"`` schedule,
    in (0, 1)), ``rank_on_processed`` (False: confidence on ``p_{1|t}``; True: on the distribution after temperature,
    top-k and top-p, as Dream), ``alg_temp`` (None or 0: the most confident positions; ``a > 0``: Dream's randomised
    ranking, positions drawn with probabilities ``softmax(c / a)``), ``threshold_rule`` (``"schedule"``: the
    transfer schedule's ``k`` plus every position above ``confidence_threshold``; ``"top1"``: Fast-dLLM's rule, the
    most confident position plus every one above it, ``num_inference_steps`` not binding; module docstring),
    ``sub_block_length`` (None, or Fast-dLLM v2's sub-blocks of that many positions, left to right inside a block)
    and ``autoregressive_first_token`` (commit a block's first position alone, before the rest of the block; both act
    on blocks only: ``block_length``, or the blocks of a block-diffusion model),
    ``editing_threshold`` (None, or LLaDA2.1's token editing: a committed token of the open window is replaced by a
    different arg-max whose probability exceeds it; :mod:`~dfm_hf.schedulers.editing`) and ``max_post_steps`` (the
    editing passes allowed once a window's masks are gone).
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
        confidence: str = "probability",
        confidence_threshold: Optional[float] = None,
        transfer_schedule: Optional[str] = None,
        transfer_eps: float = 1e-3,
        rank_on_processed: bool = False,
        alg_temp: Optional[float] = None,
        threshold_rule: str = "schedule",
        sub_block_length: Optional[int] = None,
        autoregressive_first_token: bool = False,
        editing_threshold: Optional[float] = None,
        max_post_steps: int = 0,
    ) -> None:
        if source_distribution != "mask":
            raise ValueError(
                f"`source_distribution` must be 'mask' for confidence unmasking, got {source_distribution!r}."
            )
        paths.validate_source("mask", mask_token_id, vocab_size)
        if remasking not in REMASKING:
            raise ValueError(f"`remasking` must be one of {list(REMASKING)}, got {remasking!r}.")
        if confidence not in CONFIDENCES:
            raise ValueError(f"`confidence` must be one of {list(CONFIDENCES)}, got {confidence!r}.")
        validate_sampling_args(temperature, top_k, top_p)
        check_sampling_dtype(sampling_dtype)
        validate_block_length(block_length)
        validate_transfer(transfer_schedule, confidence_threshold, threshold_rule, remasking)
        validate_dream_options(transfer_eps, rank_on_processed, alg_temp, remasking, confidence_threshold)
        validate_block_order(sub_block_length, autoregressive_first_token)
        validate_editing(editing_threshold, max_post_steps, remasking, confidence, alg_temp)
        self.token_editor: Optional[TokenEditor] = None  # LLaDA2.1's token editing (editing.py)
        if editing_threshold is not None:
            self.token_editor = TokenEditor(editing_threshold, max_post_steps, mask_token_id)
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._times: list[float] = []
        self._step_index: Optional[int] = None
        self._dream_grid: Optional[torch.Tensor] = None

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: Union[str, torch.device, None] = None,
        block_length: Optional[int] = None,
    ) -> None:
        """Uniform grid ``t_i = i / N``; step ``i`` commits ``ceil(masked / (N - i))`` tokens per row (without blocks,
        under the ``"even"`` transfer schedule; see the module docstring for the others).
        ``block_length``: diffusers' per-block calling form (:mod:`~dfm_hf.schedulers.diffusers_convention`).
        """
        validate_num_inference_steps(num_inference_steps)
        self._set_block_form(block_length)  # diffusers' per-block form (diffusers_convention)
        self._times = [i / num_inference_steps for i in range(num_inference_steps + 1)]
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(self._times[:-1], dtype=torch.float32, device=device)
        self._step_index = None
        self._dream_grid = None
        if self.token_editor is not None:
            self.token_editor.reset()
        if self.config.transfer_schedule == "dream":
            self._dream_grid = dream_grid(num_inference_steps, self.config.transfer_eps)

    def plan_step(
        self,
        sample: torch.LongTensor,
        timestep: Union[float, torch.Tensor],
        generator: GeneratorLike = None,
        condition_mask: Optional[torch.Tensor] = None,
        windows: Optional[BlockWindows] = None,
    ) -> StepPlan:
        """The :class:`StepPlan` of this step: ``positions`` are the masked free positions to rank (those of the open
        window with ``block_length`` or ``windows``), ``steps_left`` the steps left to commit all of them and
        ``commits`` how many the step commits. Draws nothing.

        ``windows``: the open windows decided by the caller (a :class:`~dfm_hf.schedulers.utils.BlockWindows` from
        :func:`~dfm_hf.schedulers.utils.block_grid_windows`: the block grid of a block-diffusion model, each row's
        block generated in its own number of steps); None: no blocks, or the split of ``block_length``.
        """
        self._check_sample(sample, condition_mask)
        check_generator(generator, sample.shape[0])
        check_windows(windows, sample)
        i = self._index_for(timestep)
        n = self.num_inference_steps
        free = torch.ones_like(sample, dtype=torch.bool) if condition_mask is None else ~condition_mask.bool()
        needs = (sample == self.config.mask_token_id) & free
        t = torch.full((sample.shape[0],), self._times[i], dtype=torch.float32, device=sample.device)
        if windows is None and self.config.block_length is None:
            width = free.sum(1)
            commits = self._commits(needs.sum(1), n - i, width, n, explicit=False)
            needs = self._idle_rows_read_nothing(needs, commits)
            if self.token_editor is not None:  # committed tokens read for editing (editing.py)
                needs = needs | self.token_editor.positions(sample, free)
            return StepPlan(i, needs, rng.row_counts(needs), steps_left=n - i, commits=commits, timesteps=t)
        blocks = windows if windows is not None else block_windows(free, self.config.block_length, i, n)
        needs = needs & blocks.window
        steps_left = blocks.last_step - i + 1
        span = blocks.last_step - blocks.first_step + 1
        if windows is not None:  # the caller's blocks: each row's local time
            t = ((i - blocks.first_step) / span).to(torch.float32)
        commits = self._commits(needs.sum(1), steps_left, blocks.width, span, explicit=windows is not None)
        if self.config.sub_block_length is not None or self.config.autoregressive_first_token:
            c, length = self.config, None if windows is not None else self.config.block_length
            needs, first = block_order(
                needs, free, length, c.sub_block_length, c.autoregressive_first_token, steps_left <= 1
            )
            commits = torch.where(first, 1, torch.minimum(commits, needs.sum(1)))
        needs = self._idle_rows_read_nothing(needs, commits)
        if self.token_editor is not None:  # committed tokens read for editing (editing.py)
            needs = needs | self.token_editor.positions(sample, free & blocks.window, blocks.num_open)
        return StepPlan(
            i,
            needs,
            rng.row_counts(needs),
            steps_left=steps_left,
            commits=commits,
            window=blocks.window,
            window_index=blocks.num_open,
            timesteps=t,
        )

    def _commits(
        self,
        masked: torch.Tensor,
        steps_left: Union[int, torch.Tensor],
        width: torch.Tensor,
        span: Union[int, torch.Tensor],
        explicit: bool,
    ) -> torch.Tensor:
        """``k`` per row under the call's transfer schedule (:func:`~dfm_hf.schedulers.transfer.commit_counts`);
        ``explicit``: the caller passed the windows (the block grid of a block-diffusion model)."""
        c = self.config
        schedule = c.transfer_schedule or ("fixed" if explicit else "even")
        if c.threshold_rule == "top1":
            schedule = "even"
        return commit_counts(schedule, masked, steps_left, width, span, self._grid_of)

    def _grid_of(self, steps: int) -> torch.Tensor:
        """Dream's grid of a window of ``steps`` steps (the call's own grid is computed once per call)."""
        if steps == self.num_inference_steps and self._dream_grid is not None:
            return self._dream_grid
        return dream_grid(steps, self.config.transfer_eps)

    def inference_steps(self, num_inference_steps: int, positions: int, block_length: Optional[int] = None) -> int:
        """The steps a call runs when ``num_inference_steps`` are asked for rows of at most ``positions`` positions
        to generate, in windows of ``block_length`` positions (None: one window).

        ``threshold_rule="schedule"``: ``num_inference_steps``. ``"top1"``: one step per position of the widest
        window, ``W * ceil(positions / W)`` with ``W = min(block_length, positions)``, whatever was asked (each window
        then gets at least one step per position, and a window ends when its positions are committed).
        """
        steps = validate_num_inference_steps(num_inference_steps)
        return top1_steps(positions, block_length) if self.config.threshold_rule == "top1" else steps

    def _idle_rows_read_nothing(self, needs: torch.Tensor, commits: torch.Tensor) -> torch.Tensor:
        """Under Dream's schedule a row whose step commits nothing (and has no threshold to apply) reads no logits."""
        if self.config.transfer_schedule != "dream" or self.config.confidence_threshold is not None:
            return needs
        return needs & (commits > 0).unsqueeze(1)

    def _confidence(
        self, rows: LogitRows, generator: GeneratorLike, plan: StepPlan, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, scores)`` for the logit rows of the step: the drawn tokens and the ranking score of each row (for
        ``"probability"`` the log-probability, which ranks like the probability). Off the greedy path the rows are
        read in chunks of at most ``chunk_bytes`` per (rows, vocab) temporary in ``dtype``."""
        c = self.config
        filtered = c.top_k is not None or (c.top_p is not None and c.top_p < 1.0)
        processed = c.rank_on_processed and c.remasking == "low_confidence"
        if (
            c.temperature == 0
            and c.remasking == "low_confidence"
            and c.confidence == "probability"
            and not (processed and filtered)
        ):
            # greedy (LLaDA's default): the arg-max and its log-probability, read in float32 (no draw is made)
            return greedy_with_log_probability(rows.all(), c.mask_token_id)
        # log q, the distribution the tokens are drawn from (at temperature 0: q at temperature 1, its arg-max drawn)
        differs = filtered or c.temperature not in (0, 1.0)
        separate_q = differs and (c.temperature != 0 or processed)
        u = draw_rows(plan.counts, generator, rows.device, dtype)[:, 0] if c.temperature != 0 else None
        tokens = torch.empty(rows.count, dtype=torch.long, device=rows.device)
        scores = torch.empty(rows.count, dtype=dtype, device=rows.device)
        for start, stop, chunk in rows.chunks(dtype, self.chunk_bytes):
            plain = process_logits(chunk, 1.0, None, None, c.mask_token_id, dtype)  # the model's log p_{1|t}
            q = plain
            if separate_q:
                q = process_logits(chunk, c.temperature or 1.0, c.top_k, c.top_p, c.mask_token_id, dtype)
            drawn = plain.argmax(-1) if u is None else inverse_cdf(q, u[start:stop])
            tokens[start:stop] = drawn
            if c.remasking != "random":
                scores[start:stop] = _score(q if processed else plain, drawn, c.confidence)
        if c.remasking == "random":
            return tokens, draw_rows(plan.counts, generator, rows.device, dtype)[:, 0]
        return tokens, scores

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
    ) -> Union[ConfidenceUnmaskingSchedulerOutput, DiscreteSchedulerOutput, tuple]:
        """Commit the ``k`` most confident draws per row (and, with ``confidence_threshold``, every draw above it).

        ``model_output`` is full (batch, length, vocab) logits or the packed rows at ``plan.positions``.

        A call with diffusers' ``options`` (``mask_token_id=``, ``temperature=``, ...; an ``int`` step index) runs
        :meth:`diffusers_step` (:mod:`~dfm_hf.schedulers.diffusers_convention`).
        """
        c = self.config
        if self._is_diffusers_call(timestep, condition_mask, plan, options):  # diffusers' form (diffusers_convention)
            return self.diffusers_step(model_output, timestep, sample, generator, return_dict, **options)
        plan = self._plan_for_step(plan, sample, timestep, generator, condition_mask)
        needs = plan.positions
        rows = LogitRows(model_output, needs, c.vocab_size, plan.counts)
        dtype = self._step_dtype(sample.device)
        tokens, scores = self._confidence(rows, generator, plan, dtype)
        if c.alg_temp and c.remasking == "low_confidence":  # Dream's randomised ranking, as a Gumbel top-k
            value = scores.to(dtype).exp() if c.confidence == "probability" else scores.to(dtype)
            u = rng.rand_at(needs, generator, dtype=dtype, counts=plan.counts).squeeze(-1)[needs]
            scores = value / c.alg_temp - (-u.clamp_min(torch.finfo(dtype).tiny).log()).log()
        conf = torch.full(sample.shape, -math.inf, dtype=dtype, device=sample.device)
        conf[needs] = scores.to(dtype)
        editable = needs & (sample != c.mask_token_id)  # committed tokens read for editing: never ranked
        edit_conf, conf = conf, conf.masked_fill(editable, -math.inf)
        if plan.commits is not None:
            k = plan.commits
        else:
            k = (needs.sum(1) + plan.steps_left - 1) // plan.steps_left
        commit = needs & self._most_confident(conf, k)
        if c.confidence_threshold is not None:
            tau = c.confidence_threshold
            if c.confidence == "probability":  # scores are log-probabilities
                tau = math.log(tau) if tau > 0 else -math.inf
            commit = commit | (needs & (conf > tau))
        commit = commit & ~editable
        drawn = sample.clone()
        drawn[needs] = tokens
        new = torch.where(commit, drawn, sample)
        if self.token_editor is not None:
            new = self.token_editor.apply(new, drawn, sample, editable, edit_conf)
        self._step_index = plan.step_index + 1
        if not return_dict:
            return (new,)
        return ConfidenceUnmaskingSchedulerOutput(prev_sample=new, pred_original_sample=drawn)

    def _most_confident(self, conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(batch, length) bool: the ``k[b]`` highest entries of each row of ``conf``. Exact ties go to the lowest
        position, or, with ``rank_on_processed``, as ``torch.topk`` over the row decides them (Dream's selection:
        ties are common there, ``q = 1`` wherever top-p keeps a single token)."""
        arange = torch.arange(conf.shape[1], device=conf.device)
        if self.config.rank_on_processed:
            kmax = int(k.max()) if k.numel() else 0
            chosen = torch.zeros(conf.shape, dtype=torch.bool, device=conf.device)
            if kmax:
                top = conf.topk(kmax, dim=1).indices
                chosen.scatter_(1, top, arange[:kmax].unsqueeze(0) < k.unsqueeze(1))
            return chosen
        order = conf.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, arange.expand_as(order))
        return ranks < k.unsqueeze(1)

    def add_noise(
        self,
        original_samples: torch.LongTensor,
        noise: torch.LongTensor,
        timesteps: Union[float, torch.Tensor],
        generator: Optional[torch.Generator] = None,
        condition_mask: Optional[torch.Tensor] = None,
    ) -> torch.LongTensor:
        """Linear mixture path ``x_t = where(u < t, x1, x0)`` (MaskGIT/LLaDA train with a linear masking rate); ``u``
        in ``sampling_dtype``."""
        dtype = self._step_dtype(original_samples.device)
        return paths.sample_path(
            original_samples, noise, timesteps, paths.PolynomialKappa(1.0), generator, condition_mask, dtype=dtype
        )

    def __len__(self) -> int:
        return self.num_inference_steps or 0


def _score(log_probs: torch.Tensor, tokens: torch.Tensor, confidence: str) -> torch.Tensor:
    """The confidence of each row of (K, vocab) ``log_probs`` with drawn ``tokens``: ``log p(token)``
    (``"probability"``), ``p_(1) - p_(2)`` (``"margin"``) or ``sum_v p(v) log p(v)`` (``"entropy"``)."""
    if confidence == "probability":
        return log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if confidence == "margin":
        top2 = log_probs.topk(min(2, log_probs.shape[-1]), dim=-1).values.exp()
        second = top2[:, 1] if top2.shape[-1] > 1 else torch.zeros_like(top2[:, 0])
        return top2[:, 0] - second
    probs = log_probs.exp()
    return (probs * log_probs.masked_fill(probs == 0, 0.0)).sum(-1)
