"""Rotary position embeddings (RoPE) of the DFM denoiser, as set by ``DFMConfig.rope_parameters``.

The inverse frequencies ``inv_freq`` and the cos/sin scaling of every ``rope_type`` come from transformers'
``ROPE_INIT_FUNCTIONS`` (``default`` from :func:`default_rope_parameters`); row ``p`` of the tables is
``attention_scaling * (cos, sin)`` of ``[p * inv_freq, p * inv_freq]`` and a head ``x`` is rotated as
``x * cos + rotate_half(x) * sin``.

This file is self-contained (it imports only ``torch``, ``transformers`` and the sibling configuration file): it is
copied next to the weights with ``modeling_dfm.py`` by ``save_pretrained``.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_dfm import DFMConfig
from .rope_parameters import rotary_dim

#: Rope types whose frequencies depend on the sequence length (``dynamic``: NTK-aware base beyond
#: ``original_max_position_embeddings``; ``longrope``: the long factors beyond it, the short ones up to it).
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


def default_rope_parameters(
    config: DFMConfig, device: Optional[torch.device] = None, seq_len: Optional[int] = None, **kwargs: Any
) -> tuple[torch.Tensor, float]:
    """Plain RoPE: ``inv_freq_j = rope_theta^(-2j / d)`` for ``j = 0..d/2 - 1`` (float32) over the rotated width
    ``d = rotary_dim`` (``head_dim`` unless ``partial_rotary_factor < 1``), and an attention scaling of 1 (the
    signature of transformers' ``ROPE_INIT_FUNCTIONS``; ``seq_len`` is unused)."""
    theta = config.rope_parameters["rope_theta"]
    dim = rotary_dim(config.head_dim, config.rope_parameters)
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    return 1.0 / (theta**exponents), 1.0


class DFMRotaryEmbedding(nn.Module):
    """Rotary tables ``(cos, sin)`` of ``config.rope_parameters``, cached per device and dtype and grown as needed.

    The tables are plain attributes (no parameters or buffers: nothing is saved, nothing depends on buffer
    initialisation); rows are selected by position ids. Under ``torch.compile`` the rows are computed from the
    positions instead (same formula), so a compiled graph never mutates the cache.

    ``dynamic`` and ``longrope`` frequencies are those transformers computes for a sequence of ``length`` positions
    (``dynamic`` rescales beyond ``original_max_position_embeddings``, default ``max_position_embeddings``;
    ``longrope`` switches to its long factors there). They follow the length of each call, with no state carried from
    one call to the next.
    """

    def __init__(self, config: DFMConfig) -> None:
        super().__init__()
        parameters = config.rope_parameters
        self.rope_type: str = parameters["rope_type"]
        self.max_position_embeddings = config.max_position_embeddings
        self.original_max_position_embeddings = int(
            parameters.get("original_max_position_embeddings") or config.max_position_embeddings
        )
        self.init_function = (
            default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        self.rope_config = config
        if self.rope_type == "dynamic" and self.original_max_position_embeddings != config.max_position_embeddings:
            # transformers' dynamic NTK rescales beyond `config.max_position_embeddings`: give it ours
            self.rope_config = copy.deepcopy(config)
            self.rope_config.max_position_embeddings = self.original_max_position_embeddings
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _seq_len_argument(self, length: int) -> Optional[int]:
        """The ``seq_len`` given to the init function for ``length`` positions: None wherever the frequencies are
        those of the model's nominal length (every static type; the length-dependent ones up to the original
        length), else the length (``dynamic``) or the first length beyond the original one (``longrope``)."""
        if self.rope_type not in LENGTH_DEPENDENT_ROPE_TYPES or length <= self.original_max_position_embeddings:
            return None
        return length if self.rope_type == "dynamic" else self.original_max_position_embeddings + 1

    def frequencies(self, length: int, device: torch.device) -> tuple[torch.Tensor, float]:
        """``(inv_freq, attention_scaling)`` for a sequence of ``length`` positions."""
        seq_len = self._seq_len_argument(length)
        if seq_len is None:
            return self.init_function(self.rope_config, device)
        if self.rope_type == "dynamic":  # as transformers' dynamic update: the length as a tensor
            return self.init_function(self.rope_config, device, seq_len=torch.tensor(seq_len, device=device))
        return self.init_function(self.rope_config, device, seq_len=seq_len)

    def _cos_sin(self, positions: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self.frequencies(length, positions.device)
        freqs = positions[..., None].float() * inv_freq.to(positions.device, torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

    def forward(
        self,
        position_ids: Optional[torch.Tensor],
        length: Optional[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``: ``(length, d)`` rows ``0..length-1`` when ``position_ids`` is None, else
        ``(batch, n, d)`` rows ``position_ids`` (``d = rotary_dim``, ``head_dim`` unless the RoPE is partial).

        ``length`` is the length of the sequence the positions belong to (positions lie in ``[0, length)``: not
        checked), with a key/value cache the whole cached sequence. ``None`` (only with ``position_ids``) means
        unknown: ``max_position_embeddings`` bounds the rows, and the length-dependent types read
        ``max(position_ids) + 1``.
        """
        if length is None:
            if position_ids is None:
                raise ValueError("`length` is required when `position_ids` is None.")
            dependent = self.rope_type in LENGTH_DEPENDENT_ROPE_TYPES
            length = int(position_ids.max()) + 1 if dependent else self.max_position_embeddings
        if torch.compiler.is_compiling():
            positions = torch.arange(length, device=device) if position_ids is None else position_ids
            return self._cos_sin(positions, length, dtype)
        regime = self._seq_len_argument(length)
        prefix = f"{device}|{dtype}|"
        key = f"{prefix}{regime}"
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < length:
            for stale in [k for k in self._tables if k.startswith(prefix)]:  # one table per device and dtype
                del self._tables[stale]
            table = self._cos_sin(torch.arange(length, device=device), length, dtype)
            self._tables[key] = table
        cos, sin = table
        if position_ids is None:
            return cos[:length], sin[:length]
        return cos[position_ids], sin[position_ids]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(batch, heads, len, head_dim)``: ``x * cos + rotate_half(x) * sin``, with tables of shape
    ``(len, d)`` (shared by the rows) or ``(batch, len, d)`` (per-row positions). With ``d < head_dim`` (partial
    RoPE) only the first ``d`` dimensions are rotated (``rotate_half`` over those) and the rest pass through."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :dim], x[..., dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


__all__ = ["DFMRotaryEmbedding", "apply_rotary", "default_rope_parameters", "rotate_half"]
