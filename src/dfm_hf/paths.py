"""Discrete probability paths: kappa schedules, source distributions and couplings.

This module is the one place the mixture-path formulas live; the scheduler, the losses and the training collator
all call it. It is pure tensor math with no Hugging Face imports.

Mixture path (per token, independent across positions)::

    p_t(x^i | x0, x1) = kappa_t * delta_{x1^i}(x^i) + (1 - kappa_t) * delta_{x0^i}(x^i)

with ``kappa_0 = 0``, ``kappa_1 = 1`` and ``kappa`` increasing.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import rng

TimeLike = Union[float, torch.Tensor]

SOURCE_DISTRIBUTIONS = ("mask", "uniform")
KAPPA_SCHEDULES = ("polynomial", "cosine")
#: Couplings ``(X0, X1)`` the collator and training build: independent (U-coupling), or conditioned on a prompt prefix
#: or on the context around infilling spans (C-coupling).
COUPLINGS = ("unconditional", "prefix", "infill")
#: What a model predicts: ``"sample"`` = logits of ``p_{1|t}`` (the denoiser), ``"epsilon"`` = logits of ``p_{0|t}``.
PREDICTION_TYPES = ("sample", "epsilon")


def _as_tensor(t: TimeLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(dtype)
    return torch.tensor(float(t), dtype=dtype)


class KappaSchedule:
    """A scheduler ``kappa: [0, 1] -> [0, 1]`` with ``kappa(0) = 0``, ``kappa(1) = 1``, increasing.

    Subclass it and implement :meth:`kappa` and :meth:`d_kappa` (the time derivative) to supply your own schedule;
    both must accept floats or tensors, work element-wise on tensors and compute in ``dtype`` (float64 unless a
    caller asks for another: a sampler's ``sampling_dtype``).
    """

    def kappa(self, t: TimeLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``kappa_t``, computed in ``dtype``."""
        raise NotImplementedError

    def d_kappa(self, t: TimeLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``d kappa_t / dt``, computed in ``dtype``."""
        raise NotImplementedError

    def rate(self, t: TimeLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The forward jump rate ``kappa'_t / (1 - kappa_t)`` of the mixture path (infinite at ``kappa_t = 1``)."""
        if dtype == torch.float64:  # schedules written without the ``dtype`` argument still give their rate
            return self.d_kappa(t) / (1.0 - self.kappa(t))
        return self.d_kappa(t, dtype=dtype) / (1.0 - self.kappa(t, dtype=dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PolynomialKappa(KappaSchedule):
    """``kappa_t = t ** n`` (``n > 0``; 1 is linear, 2 quadratic, 3 cubic); ``kappa'_t = n * t ** (n - 1)``."""

    def __init__(self, exponent: float = 1.0) -> None:
        if not isinstance(exponent, (int, float)) or isinstance(exponent, bool) or not math.isfinite(exponent):
            raise ValueError(f"`kappa_exponent` must be a finite number > 0, got {exponent!r}.")
        if exponent <= 0:
            raise ValueError(f"`kappa_exponent` must be > 0, got {exponent!r}.")
        self.exponent = float(exponent)

    def kappa(self, t: TimeLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return _as_tensor(t, dtype).clamp(0.0, 1.0) ** self.exponent

    def d_kappa(self, t: TimeLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        t = _as_tensor(t, dtype).clamp(0.0, 1.0)
        if self.exponent == 1.0:
            return torch.ones_like(t)
        return self.exponent * t ** (self.exponent - 1.0)

    def __repr__(self) -> str:
        return f"PolynomialKappa(exponent={self.exponent})"


class CosineKappa(KappaSchedule):
    """``kappa_t = 1 - cos^2(pi t / 2)``; ``kappa'_t = (pi / 2) * sin(pi t)``."""

    def kappa(self, t: TimeLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return 1.0 - torch.cos(0.5 * math.pi * _as_tensor(t, dtype).clamp(0.0, 1.0)) ** 2

    def d_kappa(self, t: TimeLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return 0.5 * math.pi * torch.sin(math.pi * _as_tensor(t, dtype).clamp(0.0, 1.0))


def get_kappa_schedule(name: str, exponent: float = 1.0) -> KappaSchedule:
    """Build a kappa schedule by name: ``"polynomial"`` (``t ** exponent``) or ``"cosine"``."""
    if name == "polynomial":
        return PolynomialKappa(exponent)
    if name == "cosine":
        return CosineKappa()
    raise ValueError(f"`kappa_schedule` must be one of {list(KAPPA_SCHEDULES)}, got {name!r}.")


def validate_source(source_distribution: str, mask_token_id: Optional[int], vocab_size: Optional[int]) -> None:
    """Check a source configuration; raise ``ValueError`` naming the offending argument."""
    if source_distribution not in SOURCE_DISTRIBUTIONS:
        raise ValueError(
            f"`source_distribution` must be one of {list(SOURCE_DISTRIBUTIONS)}, got {source_distribution!r}."
        )
    for name, value in (("mask_token_id", mask_token_id), ("vocab_size", vocab_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"`{name}` must be an integer or None, got {value!r}.")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"`vocab_size` must be >= 1, got {vocab_size}.")
    if source_distribution == "mask" and mask_token_id is None:
        raise ValueError("`mask_token_id` is required when `source_distribution` is 'mask'.")
    if source_distribution == "uniform":
        if vocab_size is None:
            raise ValueError("`vocab_size` is required when `source_distribution` is 'uniform'.")
        if vocab_size - (mask_token_id is not None) < 1:
            raise ValueError("`vocab_size` leaves no token for the uniform source once `mask_token_id` is excluded.")
    if mask_token_id is not None:
        if mask_token_id < 0 or (vocab_size is not None and mask_token_id >= vocab_size):
            raise ValueError(f"`mask_token_id` must lie in [0, vocab_size={vocab_size}), got {mask_token_id}.")


def sample_uniform_tokens(
    shape: tuple[int, ...],
    vocab_size: int,
    mask_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """I.i.d. uniform token ids in ``[0, vocab_size)`` that never equal ``mask_token_id`` (when one is given).

    Drawn on ``generator``'s device and moved to ``device`` (see :mod:`dfm_hf.rng`).
    """
    if mask_token_id is None:
        return rng.randint(vocab_size, shape, generator, device)
    ids = rng.randint(vocab_size - 1, shape, generator, device)
    return ids + (ids >= mask_token_id).to(ids.dtype)


def sample_source(
    x1: torch.Tensor,
    source_distribution: str,
    mask_token_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw ``x0`` from the source, shaped like ``x1``: all ``mask_token_id`` or i.i.d. uniform tokens."""
    validate_source(source_distribution, mask_token_id, vocab_size)
    if source_distribution == "mask":
        return torch.full_like(x1, mask_token_id)
    return sample_uniform_tokens(tuple(x1.shape), vocab_size, mask_token_id, generator, x1.device).to(x1.dtype)


def _broadcast_time(t: TimeLike, like: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    t = _as_tensor(t, dtype).to(like.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"`timesteps` must be a scalar or have shape ({like.shape[0]},), got {tuple(t.shape)}.")
    return t.view(-1, *([1] * (like.dim() - 1)))


def sample_path(
    x1: torch.Tensor,
    x0: torch.Tensor,
    t: TimeLike,
    schedule: KappaSchedule,
    generator: Optional[torch.Generator] = None,
    condition_mask: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Draw ``x_t ~ p_t(. | x0, x1)``: ``where(u < kappa_t, x1, x0)`` with ``u ~ U[0, 1)`` per token.

    ``t`` is a scalar or one time per row; ``u`` is drawn on ``generator``'s device. ``kappa_t`` and ``u`` are
    computed in ``dtype`` (float32 where the device has no float64). With a boolean ``condition_mask`` (C-coupling),
    the positions where it is True hold ``x1`` at every ``t``.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"`noise` must have the shape of `original_samples` {tuple(x1.shape)}, got {tuple(x0.shape)}.")
    time = _broadcast_time(t, x1, dtype)
    kappa = schedule.kappa(time) if dtype == torch.float64 else schedule.kappa(time, dtype=dtype)
    u = rng.rand(x1.shape, generator, x1.device, dtype)
    keep = u < kappa
    if condition_mask is not None:
        keep = keep | condition_mask.to(torch.bool)
    return torch.where(keep, x1, x0)


def coupled_source(x1: torch.Tensor, x0: torch.Tensor, condition_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """C-coupling source ``X0 = I * X1 + (1 - I) * x0`` for the boolean mask ``I = condition_mask``."""
    if condition_mask is None:
        return x0
    return torch.where(condition_mask.to(torch.bool), x1, x0)
