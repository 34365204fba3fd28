"""LLaDA2.1's token editing, an option of :class:`~dfm_hf.ConfidenceUnmaskingScheduler` (``editing_threshold``,
``max_post_steps``) usable with any model.

Inside the open window (a block of a block-diffusion model, the open window of ``block_length``, else every position
to generate) a step also reads the logits at the window's committed, non-given positions, and replaces the token
``x^j`` there by the arg-max (the drawn token) ``y^j`` when

    ``y^j != x^j``  and  ``p(y^j) > editing_threshold``

(``p`` the distribution the confidence is computed on). Given tokens (the prompt) are never edited, and editing never
counts towards the commits of the step. Per row and window:

* while the window has masked positions, every step commits masks by the schedule and edits;
* once they are gone, editing passes follow (each one reads the committed positions and edits), at most
  ``max_post_steps`` of them, and a pass that edits nothing ends them.

Passes take the steps the window has left; block-diffusion sampling runs the rest after its grid
(:func:`timesteps_with_editing`: the last step again, by index).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import torch


def validate_editing(
    editing_threshold: Any, max_post_steps: Any, remasking: str, confidence: str, alg_temp: Optional[float]
) -> None:
    """Raise ``ValueError`` naming the argument unless ``editing_threshold`` is None or a probability in (0, 1),
    ``max_post_steps`` an integer >= 0, and the ranking one editing can use (``remasking="low_confidence"``,
    ``confidence="probability"``, no ``alg_temp``)."""
    if isinstance(max_post_steps, bool) or not isinstance(max_post_steps, int) or max_post_steps < 0:
        raise ValueError(f"`max_post_steps` must be an integer >= 0, got {max_post_steps!r}.")
    if editing_threshold is None:
        return
    if (
        isinstance(editing_threshold, bool)
        or not isinstance(editing_threshold, (int, float))
        or not 0 < editing_threshold < 1
    ):
        raise ValueError(f"`editing_threshold` must be None or a probability in (0, 1), got {editing_threshold!r}.")
    if remasking != "low_confidence" or confidence != "probability" or alg_temp:
        raise ValueError(
            "`editing_threshold` compares the drawn token's probability: it needs `remasking`='low_confidence', "
            f"`confidence`='probability' and no `alg_temp`, got remasking={remasking!r}, confidence={confidence!r}, "
            f"alg_temp={alg_temp!r}."
        )


class TokenEditor:
    """The per-row state of token editing in the current window (module docstring): the editing passes done since its
    masks were gone (``post``), whether another may run (``active``), and which rows' windows are open.

    ``positions`` (called when a step is planned) says which committed positions a step reads; ``apply`` (called by
    the step) edits and advances the state. ``reset`` starts over (a new grid: ``set_timesteps``).
    """

    def __init__(self, editing_threshold: float, max_post_steps: int, mask_token_id: int) -> None:
        self.log_threshold = math.log(editing_threshold)
        self.max_post_steps = max_post_steps
        self.mask_token_id = mask_token_id
        self.reset()

    def reset(self) -> None:
        """Forget every row's state."""
        self.post: Optional[torch.Tensor] = None
        self.active: Optional[torch.Tensor] = None
        self.window_index: Optional[torch.Tensor] = None
        self.has_masks: Optional[torch.Tensor] = None
        self.open: Optional[torch.Tensor] = None

    def positions(
        self, sample: torch.Tensor, window: torch.Tensor, window_index: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(batch, length) bool: the committed positions of ``window`` (the open window's free positions) whose tokens
        the step reads for editing: every one in a row whose window still has masks, else only while its editing
        passes go on. A row whose ``window_index`` changed starts a new window."""
        batch = sample.shape[0]
        if self.post is None or self.post.shape[0] != batch or self.post.device != sample.device:
            self.post = torch.zeros(batch, dtype=torch.long, device=sample.device)
            self.active = torch.ones(batch, dtype=torch.bool, device=sample.device)
            self.window_index = None
        if window_index is not None:
            if self.window_index is not None:
                moved = window_index != self.window_index
                self.post = torch.where(moved, 0, self.post)
                self.active = self.active | moved
            self.window_index = window_index.clone()
        masked = window & (sample == self.mask_token_id)
        self.has_masks = masked.any(1)
        self.open = window.any(1)
        allowed = self.has_masks | (self.active & (self.post < self.max_post_steps))
        return window & ~masked & allowed.unsqueeze(1)

    def apply(
        self,
        new: torch.Tensor,
        drawn: torch.Tensor,
        sample: torch.Tensor,
        editable: torch.Tensor,
        log_confidence: torch.Tensor,
    ) -> torch.Tensor:
        """``new`` with the edits of this step: at ``editable`` positions where ``drawn`` differs from ``sample`` and
        ``log_confidence > log(editing_threshold)``; advances each row's passes."""
        edits = editable & (drawn != sample) & (log_confidence > self.log_threshold)
        if self.post is None:  # a step planned elsewhere: nothing read for editing
            return new
        on_pass = ~self.has_masks & editable.any(1)
        self.post = self.post + on_pass.long()
        self.active = torch.where(self.has_masks, True, torch.where(on_pass, edits.any(1), self.active))
        return torch.where(edits, drawn, new)

    def pending(self) -> bool:
        """Whether a row with an open window may still run an editing pass (one host sync)."""
        if self.post is None:
            return False
        return bool((self.open & ~self.has_masks & self.active & (self.post < self.max_post_steps)).any())


def timesteps_with_editing(
    scheduler: Any, grid: Optional[Iterable[Any]] = None
) -> Iterator[tuple[int, Union[torch.Tensor, int]]]:
    """``(i, timestep)`` for each step of ``scheduler``'s grid (``grid``: the same values wrapped, e.g. in a progress
    bar; default ``scheduler.timesteps``); then, for a scheduler with token editing, up to ``max_post_steps`` repeats
    of its last step, by index (``(N - 1, N - 1)``), while an editing pass is pending."""
    yield from enumerate(scheduler.timesteps if grid is None else grid)
    editor = getattr(scheduler, "token_editor", None)
    if editor is None:
        return
    last = len(scheduler.timesteps) - 1
    for _ in range(editor.max_post_steps):
        if not editor.pending():
            return
        yield last, last


__all__ = ["TokenEditor", "timesteps_with_editing", "validate_editing"]
