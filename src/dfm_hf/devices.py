"""Which device the library computes on when the user does not say: a leaf helper shared by training and evaluation."""

from __future__ import annotations

import torch


def accelerator_available() -> bool:
    """True when torch sees an accelerator (CUDA, MPS, XPU, ...) that accelerate would run on: ``torch.accelerator``
    where it exists (torch >= 2.6), else CUDA, MPS or XPU."""
    if hasattr(torch, "accelerator"):
        return bool(torch.accelerator.is_available())
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())
