"""How many positions a step of :class:`~dfm_hf.ConfidenceUnmaskingScheduler` commits: the transfer schedules and
the threshold rules.

``transfer_schedule`` says how many positions a step commits (``k``; the last step of a window commits what is
left in any case): ``"even"`` is the rule above, ``k = ceil(m / steps_left)`` (LLaDA's even split of the remaining
tokens); ``"fixed"`` is ``k = min(m, ceil(W / S))`` with ``W`` the width of the window (its blocks times the block
length, given positions included; without blocks the number of positions to generate) and ``S`` the steps the window
gets (SDAR's block-diffusion rule: a window with fewer masks, such as a block holding the prompt's tail, finishes
early and its remaining steps run no model); ``"dream"`` is Dream's rule: the ``S`` steps of the window run on
``t_j = linspace(1, eps, S + 1)`` (float32, ``eps = transfer_eps``, 1e-3 by default) and local step ``j`` commits
``k = floor(m * (1 - t_{j+1} / t_j))`` (computed in float32, as Dream does), the last step everything left; a step
whose ``k`` is 0 reads no logits. With Dream's defaults and ``N`` equal to the positions to generate it commits
0, 1, ..., 1, 2. ``None`` (default) picks ``"fixed"`` when the caller passes the windows (:meth:`plan_step`'s
``windows``: the block grid of a block-diffusion model) and ``"even"`` otherwise.

``threshold_rule`` says what the threshold is added to. ``"schedule"`` (default) is the rule above: the ``k`` of the
transfer schedule plus every position above ``tau``. ``"top1"`` is Fast-dLLM's rule: a step commits

    ``C = {argmax_j c_j} | {j : c_j > tau}``

over the ranked positions ``j`` of the row (the single most confident one plus every one above ``tau``), and
``num_inference_steps`` is not binding: a window takes as many steps as it needs, at most one per position.
:meth:`inference_steps` tells the pipeline how many steps to run for that (one per position of the widest window,
times the windows); a window whose positions are all committed reads no logits for the rest of its steps. It is the
``"even"`` count ``k = ceil(m / steps_left)`` on such a grid (``m <= steps_left`` at every step, so ``k = 1``; should a
callback re-mask positions, the window's last step still commits all of them), and needs ``confidence_threshold``
(``transfer_schedule`` None or ``"even"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional, Union

import torch

TRANSFER_SCHEDULES = ("even", "fixed", "dream")
THRESHOLD_RULES = ("schedule", "top1")


def commit_counts(
    schedule: str,
    masked: torch.Tensor,
    steps_left: Union[int, torch.Tensor],
    width: torch.Tensor,
    span: Union[int, torch.Tensor],
    grid_of: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """``k`` per row of ``masked`` (the masked positions of each row's window): ``ceil(m / steps_left)``
    (``"even"``), ``min(m, max(ceil(W / S), ceil(m / steps_left)))`` (``"fixed"``, ``W = width``, ``S = span``: the
    second term only ever matters when a callback re-masked positions), or Dream's ``floor(m * (1 - t_{j+1} / t_j))``
    at local step ``j = S - steps_left`` (``"dream"``, ``m`` at the last step; ``grid_of(S)`` gives the grid)."""
    if schedule == "dream":
        return dream_commits(masked, steps_left, span, grid_of)
    even = (masked + steps_left - 1) // steps_left
    if schedule == "even":
        return even
    fixed = (width + span - 1) // span
    return torch.minimum(masked, torch.maximum(fixed, even))


def dream_commits(
    masked: torch.Tensor,
    steps_left: Union[int, torch.Tensor],
    span: Union[int, torch.Tensor],
    grid_of: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """Dream's ``int(m * (1 - t_{j+1} / t_j))`` in float32 on ``t = linspace(1, eps, S + 1)``, ``m`` at the last
    step; ``S`` and ``steps_left`` may differ per row (blocks)."""
    spans = torch.as_tensor(span).expand(masked.shape).cpu()
    local = spans - torch.as_tensor(steps_left).expand(masked.shape).cpu()
    ratio = torch.empty(masked.shape, dtype=torch.float32)
    for s in spans.unique().tolist():
        grid = grid_of(s)
        rows = spans == s
        j = local[rows].clamp(0, s - 1)
        ratio[rows] = 1 - grid[j + 1] / grid[j]
    k = (masked.to(torch.float32) * ratio.to(masked.device)).floor().to(masked.dtype)
    last = torch.as_tensor(steps_left, device=masked.device) <= 1
    return torch.where(last, masked, torch.minimum(k, masked))


def dream_grid(steps: int, eps: float) -> torch.Tensor:
    """Dream's time grid ``linspace(1, eps, steps + 1)`` in float32 (on the CPU: the commit counts are read from it)."""
    return torch.linspace(1, eps, steps + 1, dtype=torch.float32)


def top1_steps(positions: int, block_length: Optional[int] = None) -> int:
    """The steps a call runs under ``threshold_rule="top1"``: one per position of the widest window,
    ``W * ceil(positions / W)`` with ``W = min(block_length, positions)`` (None: one window)."""
    width = positions if block_length is None else min(block_length, positions)
    width = max(width, 1)
    return width * -(-max(positions, 1) // width)


def validate_transfer(
    transfer_schedule: object, confidence_threshold: object, threshold_rule: object, remasking: str
) -> None:
    """Raise ``ValueError`` naming the argument for a ``transfer_schedule`` not in :data:`TRANSFER_SCHEDULES` (or
    None), a ``confidence_threshold`` that is not None or a finite number (or set with ``remasking="random"``), and
    a bad ``threshold_rule`` (:data:`THRESHOLD_RULES`; ``"top1"`` needs the threshold and the ``"even"`` count)."""
    if transfer_schedule is not None and transfer_schedule not in TRANSFER_SCHEDULES:
        raise ValueError(
            f"`transfer_schedule` must be None or one of {list(TRANSFER_SCHEDULES)}, got {transfer_schedule!r}."
        )
    if confidence_threshold is not None:
        if (
            isinstance(confidence_threshold, bool)
            or not isinstance(confidence_threshold, (int, float))
            or not math.isfinite(confidence_threshold)
        ):
            raise ValueError(f"`confidence_threshold` must be None or a finite number, got {confidence_threshold!r}.")
        if remasking != "low_confidence":
            raise ValueError(
                "`confidence_threshold` needs `remasking`='low_confidence' (a random order has no confidence), "
                f"got remasking={remasking!r}."
            )
    _validate_threshold_rule(threshold_rule, confidence_threshold, transfer_schedule)


def validate_dream_options(
    transfer_eps: object,
    rank_on_processed: object,
    alg_temp: object,
    remasking: str,
    confidence_threshold: Optional[float],
) -> None:
    """Raise ``ValueError`` naming the argument for a bad ``transfer_eps``, ``rank_on_processed`` or ``alg_temp``."""
    if (
        isinstance(transfer_eps, bool)
        or not isinstance(transfer_eps, (int, float))
        or not math.isfinite(transfer_eps)
        or not 0 < transfer_eps < 1
    ):
        raise ValueError(f"`transfer_eps` must be a number in (0, 1) (Dream's eps), got {transfer_eps!r}.")
    if not isinstance(rank_on_processed, bool):
        raise ValueError(f"`rank_on_processed` must be True or False, got {rank_on_processed!r}.")
    if alg_temp is None:
        return
    if (
        isinstance(alg_temp, bool)
        or not isinstance(alg_temp, (int, float))
        or not math.isfinite(alg_temp)
        or alg_temp < 0
    ):
        raise ValueError(f"`alg_temp` must be None or a finite number >= 0, got {alg_temp!r}.")
    if alg_temp > 0 and remasking != "low_confidence":
        raise ValueError(
            f"`alg_temp` needs `remasking`='low_confidence' (it randomises the confidence ranking), got {remasking!r}."
        )
    if alg_temp > 0 and confidence_threshold is not None:
        raise ValueError(
            "`alg_temp` and `confidence_threshold` cannot be combined: pick the random or the threshold rule."
        )


def _validate_threshold_rule(
    threshold_rule: object, confidence_threshold: Optional[float], transfer_schedule: Optional[str]
) -> None:
    """Raise ``ValueError`` naming ``threshold_rule`` for a value not in :data:`THRESHOLD_RULES`, and for ``"top1"``
    without ``confidence_threshold`` or with a transfer schedule other than None / ``"even"``."""
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"`threshold_rule` must be one of {list(THRESHOLD_RULES)}, got {threshold_rule!r}.")
    if threshold_rule != "top1":
        return
    if confidence_threshold is None:
        raise ValueError(
            "`threshold_rule`='top1' (Fast-dLLM's rule: the most confident position plus every one above the "
            "threshold) needs `confidence_threshold`, got None."
        )
    if transfer_schedule not in (None, "even"):
        raise ValueError(
            "`threshold_rule`='top1' commits one position a step plus those above the threshold: `transfer_schedule` "
            f"must be None or 'even', got {transfer_schedule!r}."
        )


__all__ = [
    "THRESHOLD_RULES",
    "TRANSFER_SCHEDULES",
    "commit_counts",
    "dream_commits",
    "dream_grid",
    "top1_steps",
    "validate_dream_options",
    "validate_transfer",
]
