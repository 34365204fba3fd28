"""Streaming the drafts of a generation, in transformers' ``TextDiffusionStreamer`` protocol.

A streamer has ``put(value)``, optionally ``put_draft(value)``, and ``end()``. A sampling loop calls

* ``put(prompt)`` once, before the first step: the columns before the first generated one;
* ``put_draft(value=canvas)`` after every step that ran the model: the whole current draft, every column after the
  tokens already confirmed (masks included, at the positions still to generate);
* ``put(tokens)`` when tokens are final: a block-diffusion model confirms each block when it finishes, a
  full-attention model confirms the whole canvas after its last step;
* ``end()`` once, at the end.

Confirmed tokens followed by the draft always make up the whole row. Values are ``(rows, columns)`` LongTensors on
the CPU (one row per output row of the call; a row that has stopped shows the pad id). transformers'
``TextStreamer`` / ``TextDiffusionStreamer`` (one row) plug in as they are; a streamer without ``put_draft``
receives only ``put`` and ``end``. :class:`DraftFeed` is the loop's side of the protocol, :class:`TerminalStreamer`
draws the canvas live (``dfm-hf generate --stream``).
"""

from __future__ import annotations

import shutil
import sys
from typing import Any, Optional, TextIO

import torch

#: How :class:`TerminalStreamer` draws a position that is still masked.
MASK_PLACEHOLDER = "░"


class DraftFeed:
    """Feeds a streamer from a sampling loop (the calls of the module docstring); every method is a no-op without a
    streamer.

    Args:
        streamer: the streamer, or None.
        pad_token_id: shown in the rows a call marks as stopped (``rows``).
    """

    def __init__(self, streamer: Optional[Any], pad_token_id: int) -> None:
        self.streamer = streamer
        self.drafts = streamer is not None and callable(getattr(streamer, "put_draft", None))
        self.pad_token_id = pad_token_id
        self.nfe = 0  # model calls seen when the last draft went out

    def _host(self, value: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        if rows is not None:
            value = value.masked_fill(~rows.to(value.device).unsqueeze(1), self.pad_token_id)
        return value.detach().cpu()

    def put(self, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """``streamer.put(tokens)``: ``(rows, columns)`` tokens that are final (``rows``: bool per row, False for a
        row that has stopped)."""
        if self.streamer is not None:
            self.streamer.put(self._host(tokens, rows))

    def draft(self, canvas: torch.Tensor, nfe: int, rows: Optional[torch.Tensor] = None) -> None:
        """``streamer.put_draft(value=canvas)`` when the model ran since the last draft (``nfe`` grew)."""
        if nfe == self.nfe:
            return
        self.nfe = nfe
        if self.drafts:
            self.streamer.put_draft(value=self._host(canvas, rows))

    def end(self) -> None:
        """``streamer.end()``."""
        if self.streamer is not None:
            self.streamer.end()


def _rows(value: torch.Tensor) -> list[list[int]]:
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or value.is_floating_point():
        raise ValueError("a streamed value must be a (rows, columns) or (columns,) integer tensor.")
    return [value.tolist()] if value.dim() == 1 else value.tolist()


class TerminalStreamer:
    """Draws each row's canvas live: confirmed text, then the current draft with every masked position shown as
    ``placeholder``; ``end()`` clears the live canvas (the caller prints the result).

    On a terminal each draft redraws the canvas in place (ANSI cursor moves; the canvas is cut to its last lines that
    fit the window). Elsewhere (a file, a pipe) every draft is written as a block of its own, followed by a newline.

    Args:
        tokenizer: decodes the tokens (special tokens skipped).
        mask_token_id: the id drawn as ``placeholder`` (default: the tokenizer's mask token).
        placeholder: what a masked position looks like.
        file: where to draw (default ``sys.stderr``, so that stdout keeps only the result).
        skip_prompt: leave the prompt (the first ``put``) out of the canvas.
    """

    def __init__(
        self,
        tokenizer: Any,
        mask_token_id: Optional[int] = None,
        placeholder: str = MASK_PLACEHOLDER,
        file: Optional[TextIO] = None,
        skip_prompt: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.mask_token_id = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
        if self.mask_token_id is None:
            raise ValueError("`mask_token_id` is needed: the tokenizer has no mask token.")
        if not isinstance(placeholder, str) or not placeholder:
            raise ValueError(f"`placeholder` must be a non-empty string, got {placeholder!r}.")
        self.placeholder = placeholder
        self.file = sys.stderr if file is None else file
        self.skip_prompt = skip_prompt
        self.live = bool(getattr(self.file, "isatty", lambda: False)())
        self.confirmed: list[list[int]] = []
        self.draft: list[list[int]] = []
        self.drafts_drawn = 0
        self._prompt_seen = False
        self._drawn_lines = 0  # terminal lines of the canvas on screen (live mode)

    # ------------------------------------------------------------------ protocol
    def put(self, value: torch.Tensor) -> None:
        """Append final tokens to each row (the first call holds the prompt) and drop the draft."""
        rows = _rows(value)
        first = not self._prompt_seen
        self._prompt_seen = True
        if first:
            self.confirmed = [[] for _ in rows]
            if self.skip_prompt:
                self.draft = [[] for _ in rows]
                return
        self._check_rows(rows)
        for mine, new in zip(self.confirmed, rows):
            mine.extend(new)
        self.draft = [[] for _ in rows]
        self._draw()

    def put_draft(self, value: torch.Tensor, **_: Any) -> None:
        """Replace the draft of each row (everything after its confirmed tokens) and redraw."""
        rows = _rows(value)
        if not self._prompt_seen:
            self.confirmed, self._prompt_seen = [[] for _ in rows], True
        self._check_rows(rows)
        self.draft = rows
        self.drafts_drawn += 1
        self._draw()

    def end(self) -> None:
        """Clear the live canvas and reset for the next generation."""
        if self.live:
            self._erase()
            self.file.flush()
        self.confirmed, self.draft, self._prompt_seen = [], [], False

    # ------------------------------------------------------------------ drawing
    def text(self, row: int = 0) -> str:
        """Row ``row`` as drawn: confirmed tokens and draft, masked positions as the placeholder."""
        ids = self.confirmed[row] + (self.draft[row] if row < len(self.draft) else [])
        parts, run = [], []
        for token in ids + [None]:
            if token is not None and token != self.mask_token_id:
                run.append(token)
                continue
            if run:
                parts.append(self.tokenizer.decode(run, skip_special_tokens=True))
                run = []
            if token is not None:
                parts.append(self.placeholder)
        return "".join(parts)

    def _check_rows(self, rows: list[list[int]]) -> None:
        if len(rows) != len(self.confirmed):
            raise ValueError(f"the streamer was started with {len(self.confirmed)} rows, got a value with {len(rows)}.")

    def _canvas(self) -> str:
        return "\n\n".join(self.text(b) for b in range(len(self.confirmed)))

    def _draw(self) -> None:
        canvas = self._canvas()
        if not self.live:
            self.file.write(canvas + "\n")
            self.file.flush()
            return
        size = shutil.get_terminal_size()
        lines = _wrapped(canvas.expandtabs(), size.columns)[-max(size.lines - 1, 1) :]  # tabs: the terminal's stops
        self._erase()
        self.file.write("\n".join(lines))
        self.file.flush()
        self._drawn_lines = len(lines)

    def _erase(self) -> None:
        if self._drawn_lines > 1:
            self.file.write(f"\033[{self._drawn_lines - 1}A")
        if self._drawn_lines:
            self.file.write("\r\033[J")
        self._drawn_lines = 0


def _wrapped(text: str, width: int) -> list[str]:
    """``text`` cut into the terminal lines it occupies at ``width`` columns."""
    width = max(width, 1)
    lines = []
    for line in text.split("\n"):
        lines.extend(line[i : i + width] for i in range(0, max(len(line), 1), width))
    return lines


__all__ = ["DraftFeed", "MASK_PLACEHOLDER", "TerminalStreamer"]
