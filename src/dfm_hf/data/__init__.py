"""Data helpers: tokenizers, corpora and SFT conversations (names resolve lazily)."""

from __future__ import annotations

from .._lazy import lazy_attributes

_EXPORTS = {name: ".tokenizer" for name in ("EOS_TOKEN", "MASK_TOKEN", "PAD_TOKEN", "train_bpe_tokenizer")}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
