"""The outputs of the DFM models (transformers ``ModelOutput`` dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput


@dataclass
class DFMModelOutput(ModelOutput):
    """Output of :class:`DFMModel`.

    Args:
        last_hidden_state: ``(batch, len, hidden)`` after the final norm (``len`` = the query positions given).
        cache: the key/value cache the forward used (``use_cache=True``: a new ``DynamicCache`` holding every layer's
            keys and values after rotary, ``(batch, num_key_value_heads, len, head_dim)``), read as
            ``output.past_key_values``. transformers 5.x ``ModelOutput`` renames a field called ``past_key_values`` to
            ``cache``, so the field carries that name and ``past_key_values`` is a property.
        hidden_states: with ``output_hidden_states=True``, the embeddings and the output of every layer (the last
            one after the final norm).
        attentions: with ``output_attentions=True``, the attention probabilities of every layer,
            ``(batch, heads, len, key_len)``.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    cache: Optional[Cache] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None

    @property
    def past_key_values(self) -> Optional[Cache]:
        """The key/value cache (the ``cache`` field)."""
        return self.cache


@dataclass
class DFMMaskedGenerationOutput(ModelOutput):
    """Output of :class:`DFMForMaskedGeneration`.

    Args:
        loss: the masked cross-entropy when ``labels`` were given.
        logits: ``(batch, len, vocab)``; ``(K, vocab)`` for a boolean ``logits_to_keep``; ``(batch, len(idx), vocab)``
            for an index ``logits_to_keep``; ``(batch, N, vocab)`` for an int ``N > 0``. ``logits[..., i, :]``
            parametrises ``p_{1|t}(x^i | x_t)`` (or ``p_{0|t}`` for an epsilon model), with or without
            ``config.logits_shift``.
        cache: the key/value cache (see :class:`DFMModelOutput`), read as ``output.past_key_values``.
        hidden_states: with ``output_hidden_states=True``, the embeddings and the output of every layer (the last
            one after the final norm).
        attentions: with ``output_attentions=True``, the attention probabilities of every layer.
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    cache: Optional[Cache] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None

    @property
    def past_key_values(self) -> Optional[Cache]:
        """The key/value cache (the ``cache`` field)."""
        return self.cache


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


__all__ = ["DFMMaskedGenerationOutput", "DFMModelOutput"]
