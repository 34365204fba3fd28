"""Logic shared by our schedulers: the step plan, time-index lookup, input checks, and `compatibles` resolution."""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .sampling import CHUNK_BYTES, SAMPLING_DTYPES, resolve_sampling_dtype

#: Largest accepted ``num_inference_steps`` (a bound on the size of the time grid a config can ask for).
MAX_INFERENCE_STEPS = 1_000_000


def validate_num_inference_steps(num_inference_steps: object) -> int:
    """Return ``num_inference_steps`` if it is an integer in ``[1, MAX_INFERENCE_STEPS]``, else raise ``ValueError``."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
    if not 1 <= num_inference_steps <= MAX_INFERENCE_STEPS:
        raise ValueError(f"`num_inference_steps` must lie in [1, {MAX_INFERENCE_STEPS}], got {num_inference_steps}.")
    return num_inference_steps


def validate_block_length(block_length: object) -> None:
    """Raise ``ValueError`` unless ``block_length`` is None or an integer in ``[1, 1000000]``."""
    if block_length is not None and (
        isinstance(block_length, bool) or not isinstance(block_length, int) or not 1 <= block_length <= 1_000_000
    ):
        raise ValueError(f"`block_length` must be None or an integer in [1, 1000000], got {block_length!r}.")


@dataclass
class StepPlan:
    """What one scheduler step will do, decided before the model runs (returned by ``scheduler.plan_step``).

    Pass it back as ``scheduler.step(model_output, timestep, sample, plan=plan)``: the step then applies exactly
    these decisions to the ``sample`` the plan was made for, and ``model_output`` may be the packed (K, vocab)
    logit rows at ``positions`` (what a model called with ``logits_to_keep=plan.positions`` returns).

    Args:
        step_index: index of the step's time in the scheduler's grid.
        positions: (batch, length) bool, where the step reads logits (nowhere True: the model need not run).
        counts: ``positions`` per batch row, as python ints.
        forward: DFM: positions that jump to a draw of ``p_{1|t}``.
        backward: DFM: positions sent back towards the source (the corrector).
        kappa: DFM: ``kappa_t`` of the step (a (batch,) tensor with blocks).
        steps_left: confidence unmasking: steps left to commit the ranked positions (an int, or (batch,) with
            blocks).
        commits: confidence unmasking: (batch,) long, how many of the ranked positions the step commits in each row
            (at least: a ``confidence_threshold`` may add more).
        window: block schedulers: (batch, length) bool, the generated positions of the open block(s); None without
            blocks.
        window_index: block schedulers: (batch,) long, how many blocks of each row are open (it changes exactly when
            a block opens).
        timesteps: (batch,) float32, the time a time-conditioned model should see for each row.
    """

    step_index: int
    positions: torch.BoolTensor
    counts: list[int]
    forward: Optional[torch.BoolTensor] = None
    backward: Optional[torch.BoolTensor] = None
    kappa: Optional[Union[float, torch.Tensor]] = None
    steps_left: Optional[Union[int, torch.Tensor]] = None
    commits: Optional[torch.LongTensor] = None
    window: Optional[torch.BoolTensor] = None
    window_index: Optional[torch.LongTensor] = None
    timesteps: Optional[torch.Tensor] = None


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


class DFMSchedulerMixin:
    """Mixed into each dfm_hf scheduler before diffusers' ``SchedulerMixin``.

    Expects ``self._times`` (the grid, ``N + 1`` python floats ending at 1.0), ``self.num_inference_steps`` and
    ``self._step_index`` to be maintained by the scheduler.

    ``chunk_bytes``: the largest (rows, vocab) temporary a step builds at once (it reads its logit rows in chunks;
    the samples do not depend on it). Set it on an instance to trade memory for fewer, larger chunks.
    """

    chunk_bytes: int = CHUNK_BYTES

    def _step_dtype(self, device: Union[str, torch.device]) -> torch.dtype:
        """The dtype of every draw and probability of a step on ``device``: ``sampling_dtype``, or float32 where the
        device has no float64 (:func:`~dfm_hf.schedulers.sampling.resolve_sampling_dtype`), said once per
        scheduler instance by a ``UserWarning``."""
        wanted = SAMPLING_DTYPES[self.config.sampling_dtype]
        dtype = resolve_sampling_dtype(wanted, device)
        if dtype != wanted and not self.__dict__.get("_warned_dtype_fallback", False):
            self._warned_dtype_fallback = True
            warnings.warn(
                f"`sampling_dtype`={self.config.sampling_dtype!r} is not available on {torch.device(device).type}: "
                f"{type(self).__name__} draws in float32 there (samples may differ from a float64 run).",
                UserWarning,
                stacklevel=3,
            )
        return dtype

    @classmethod
    def _get_compatibles(cls) -> list:
        """Resolve ``_compatibles`` names among dfm_hf's schedulers (diffusers only looks in its own namespace)."""
        ours = importlib.import_module("dfm_hf.schedulers")
        names = {cls.__name__, *cls._compatibles}
        return [getattr(ours, n) for n in sorted(names) if hasattr(ours, n)]

    def inference_steps(self, num_inference_steps: int, positions: int, block_length: Optional[int] = None) -> int:
        """The steps a sampling loop runs when ``num_inference_steps`` are asked, for rows of at most ``positions``
        positions to generate in windows of ``block_length`` (None: one window): ``num_inference_steps`` here; a
        scheduler whose step count is not binding (``ConfidenceUnmaskingScheduler(threshold_rule="top1")``) says
        otherwise."""
        return validate_num_inference_steps(num_inference_steps)

    def _grid_lookup(self) -> dict[float, int]:
        """``{time: first index}`` of the grid, both as stored (python floats) and rounded to float32 (the values of
        ``self.timesteps``); built once per grid, on the first look-up that the step counter does not answer."""
        cached = getattr(self, "_grid_lookup_cache", None)
        if cached is not None and cached[0] is self._times:
            return cached[1]
        times = self._times[: self.num_inference_steps]
        lookup: dict[float, int] = {}
        for values in (times, torch.tensor(times, dtype=torch.float32).tolist()):
            for i, value in enumerate(values):
                lookup.setdefault(value, i)
        self._grid_lookup_cache = (self._times, lookup)
        return lookup

    def _index_for(self, timestep: Union[int, float, torch.Tensor]) -> int:
        """Index in the grid of ``timestep``, by one rule on every device and without tolerance.

        An ``int`` is a step index (diffusers' discrete schedulers). A time is read as the step the counter points at
        (the next step of the loop, 0 after ``set_timesteps``) when it equals that grid value exactly, as stored or as
        the float32 value in ``timesteps``; otherwise as the first grid step holding exactly that value. A tensor
        on an accelerator is not read back (no host sync): the counter's step is used and the equality is asserted on
        the device (``torch._assert_async``), so steps there must be taken in grid order. ``ValueError`` before
        ``set_timesteps`` or for a time off the grid.
        """
        if not self._times:
            raise ValueError("`set_timesteps` must be called before `step`/`plan_step` (no time grid is set).")
        n = self.num_inference_steps
        expected = self._step_index if self._step_index is not None and self._step_index < n else 0
        if isinstance(timestep, int) and not isinstance(timestep, bool):
            if not 0 <= timestep < n:
                raise ValueError(f"`timestep` as a step index must be in [0, {n}), got {timestep}.")
            return timestep
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.is_complex() or timestep.dtype == torch.bool:
                raise ValueError(f"`timestep` must be a real scalar, got {timestep.dtype} {tuple(timestep.shape)}.")
            if timestep.device.type != "cpu":
                grid = self.timesteps if self.timesteps is not None else torch.tensor(self._times[:n])
                target = grid[expected].to(device=timestep.device, dtype=timestep.dtype)
                torch._assert_async(timestep.reshape(()) == target, "`timestep` is not the next step of the grid")
                return expected
            timestep = timestep.item()
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise ValueError(f"`timestep` must be a float from `scheduler.timesteps`, got {type(timestep).__name__}.")
        stored = self._times[expected]
        if timestep == stored or timestep == torch.tensor(stored, dtype=torch.float32).item():
            return expected
        index = self._grid_lookup().get(float(timestep))
        if index is None:
            raise ValueError(f"`timestep` {timestep!r} is not on the grid set by `set_timesteps` (see `.timesteps`).")
        return index

    def _plan_for_step(
        self,
        plan: Optional[StepPlan],
        sample: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        generator: object,
        condition_mask: Optional[torch.Tensor],
    ) -> StepPlan:
        """``plan`` checked against ``sample`` and ``timestep``, or a fresh plan when it is None."""
        if plan is None:
            return self.plan_step(sample, timestep, generator=generator, condition_mask=condition_mask)
        if not isinstance(plan, StepPlan):
            raise ValueError(f"`plan` must be the StepPlan returned by `plan_step`, got {type(plan).__name__}.")
        if plan.positions.shape != sample.shape:
            raise ValueError(
                f"`plan` was made for a sample of shape {tuple(plan.positions.shape)}, got {tuple(sample.shape)}."
            )
        index = self._index_for(timestep)
        if plan.step_index != index:
            raise ValueError(f"`plan` was made for step {plan.step_index}, but `timestep` is step {index} of the grid.")
        return plan

    def _check_sample(self, sample: torch.Tensor, condition_mask: Optional[torch.Tensor]) -> None:
        if not isinstance(sample, torch.Tensor) or sample.dim() != 2 or sample.is_floating_point():
            raise ValueError("`sample` must be a (batch, length) integer tensor of token ids.")
        if condition_mask is not None and (
            not isinstance(condition_mask, torch.Tensor) or condition_mask.shape != sample.shape
        ):
            raise ValueError(f"`condition_mask` must be a bool tensor shaped like `sample` {tuple(sample.shape)}.")


@dataclass
class BlockWindows:
    """Where step ``i`` of ``N`` stands in the semi-autoregressive block schedule of each row (see
    :func:`block_windows`); every field is a (batch,) long tensor except the two (batch, length) bool masks."""

    block: torch.LongTensor  # (batch, length) block index of each free position (meaningless elsewhere)
    window: torch.BoolTensor  # free positions of the blocks open at this step and not yet due
    opened: torch.BoolTensor  # free positions of every block opened so far (the window and the finished ones)
    num_open: torch.LongTensor  # w_i: blocks opened so far
    first_step: torch.LongTensor  # s: the step at which the window opened
    last_step: torch.LongTensor  # d: the step by which the window must be complete
    width: torch.LongTensor  # W: positions the window spans (its blocks times the block length)


def block_windows(free: torch.Tensor, block_length: int, step_index: int, num_steps: int) -> BlockWindows:
    """LLaDA's split of ``N`` steps over the ``B = ceil(free / L)`` blocks of each row (blocks of ``L`` generated
    positions, left to right).

    After step ``i`` the first ``w_i = ceil((i + 1) B / N)`` blocks are open; the steps with the same ``w_i`` form a
    period that opens the window of blocks ``[ceil(s B / N), w_i)`` at step ``s = floor((w_i - 1) N / B)`` and must
    complete it by step ``d = floor(w_i N / B) - 1``. With ``N`` a multiple of ``B`` every block gets ``N / B`` steps
    of its own (LLaDA's schedule); with ``N < B`` a step opens several blocks at once.
    """
    i, n = step_index, num_steps
    block = (free.long().cumsum(1) - 1).div(block_length, rounding_mode="floor")
    blocks = (free.long().sum(1) + block_length - 1).div(block_length, rounding_mode="floor").clamp(min=1)
    num_open = ((i + 1) * blocks + n - 1).div(n, rounding_mode="floor")
    first_step = ((num_open - 1) * n).div(blocks, rounding_mode="floor")
    low = (first_step * blocks + n - 1).div(n, rounding_mode="floor")
    last_step = (num_open * n).div(blocks, rounding_mode="floor") - 1
    opened = free & (block < num_open.unsqueeze(1))
    window = opened & (block >= low.unsqueeze(1))
    return BlockWindows(block, window, opened, num_open, first_step, last_step, (num_open - low) * block_length)


def check_windows(windows: object, sample: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``windows`` unless it is None or a :class:`BlockWindows` for ``sample``'s shape."""
    if windows is None:
        return
    if not isinstance(windows, BlockWindows):
        raise ValueError(
            f"`windows` must be None or a BlockWindows (see `block_grid_windows`), got {type(windows).__name__}."
        )
    if windows.window.shape != sample.shape:
        raise ValueError(
            f"`windows` were made for a sample of shape {tuple(windows.window.shape)}, got {tuple(sample.shape)}."
        )


def block_grid_windows(
    free: torch.Tensor, steps: torch.Tensor, step_index: int, block_index: int, width: int
) -> BlockWindows:
    """The windows of a block-diffusion sampler, decided by the caller: one block per row, the same for every row
    (``free`` (batch, length) bool: its positions to generate; ``length`` may be the block alone), which row ``b``
    generates in ``steps[b]`` steps of its own (0: the row is idle).

    At step ``i`` of the block (``step_index``) a row with ``i < steps[b]`` has its free positions as the window,
    opened at step 0 and due by step ``steps[b] - 1`` (its local time is ``i / steps[b]``); a row with
    ``i >= steps[b]`` has an empty window. ``width`` is the block length ``W`` (the positions the block spans, its
    given ones included); ``block_index`` numbers the block (``num_open = block_index + 1``).
    """
    batch = free.shape[0]
    steps = torch.as_tensor(steps, dtype=torch.long, device=free.device)
    active = steps > step_index
    window = free & active.unsqueeze(1)
    index = torch.full((batch,), step_index, dtype=torch.long, device=free.device)
    first_step = torch.where(active, torch.zeros_like(index), index)
    last_step = torch.where(active, steps - 1, index)
    block = torch.full_like(free, block_index, dtype=torch.long)
    num_open = torch.full((batch,), block_index + 1, dtype=torch.long, device=free.device)
    return BlockWindows(block, window, window, num_open, first_step, last_step, torch.full_like(index, width))


def validate_block_order(sub_block_length: object, autoregressive_first_token: object) -> None:
    """Raise ``ValueError`` naming the argument unless ``sub_block_length`` is None or an integer in ``[1, 1000000]``
    and ``autoregressive_first_token`` is a bool."""
    if sub_block_length is not None and (
        isinstance(sub_block_length, bool)
        or not isinstance(sub_block_length, int)
        or not 1 <= sub_block_length <= 1_000_000
    ):
        raise ValueError(f"`sub_block_length` must be None or an integer in [1, 1000000], got {sub_block_length!r}.")
    if not isinstance(autoregressive_first_token, bool):
        raise ValueError(f"`autoregressive_first_token` must be True or False, got {autoregressive_first_token!r}.")


def block_order(
    needs: torch.Tensor,
    free: torch.Tensor,
    block_length: Optional[int],
    sub_block_length: Optional[int],
    autoregressive_first_token: bool,
    last_step: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM v2's order inside a window: ``(needs, first)``, the positions a step ranks and the rows whose step
    is an autoregressive one.

    ``needs`` (batch, length) bool: the window's masked positions, among the ``free`` ones. A position's offset in its
    block is its column when ``block_length`` is None (the sample is the block of a block-diffusion model, its given
    positions counted), else its rank among the free positions modulo ``block_length`` (the blocks of
    :func:`block_windows`). With ``autoregressive_first_token`` a row whose position at offset 0 is masked ranks that
    position alone (``first``: it commits it, one position).
    With ``sub_block_length = S`` the other rows rank only the first sub-block (offsets ``[s S, (s + 1) S)``) that
    still holds a masked position, except at their window's last step (``last_step``, (batch,) bool), which ranks
    every masked position of the window so that it completes.
    """
    if block_length is None:
        offsets = torch.arange(needs.shape[1], device=needs.device).expand_as(needs)
    else:
        offsets = (free.long().cumsum(1) - 1).remainder(block_length)
    first = torch.zeros(needs.shape[0], dtype=torch.bool, device=needs.device)
    if autoregressive_first_token:
        at_start = needs & (offsets == 0)
        first = at_start.any(1)
        needs = torch.where(first.unsqueeze(1), at_start, needs)
    if sub_block_length is not None:
        sub = offsets.div(sub_block_length, rounding_mode="floor")
        open_sub = torch.where(needs, sub, torch.iinfo(torch.long).max).amin(1)
        keep = (sub == open_sub.unsqueeze(1)) | (last_step & ~first).unsqueeze(1)
        needs = needs & keep
    return needs, first
