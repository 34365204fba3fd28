"""Configuration of the Discrete Flow Matching denoiser (``model_type = "dfm"``).

This file is self-contained (it imports only ``transformers``): it is copied next to the weights by
``save_pretrained`` and loaded as remote code with ``trust_remote_code=True``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

from transformers import PretrainedConfig

LOSS_TYPES = ("ce", "generalized_kl")

#: Size presets for :meth:`DFMConfig.from_preset`. ``intermediate_size`` is about 8/3 of ``hidden_size`` (gated MLP).
DFM_PRESETS: dict[str, dict[str, Any]] = {
    # For tests and smoke runs: about 0.1M parameters plus the embedding table.
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 176,
        "max_position_embeddings": 512,
    },
    # About 5M parameters plus the embedding table.
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "intermediate_size": 704,
        "max_position_embeddings": 1024,
    },
    # About 85M parameters plus the embedding table (the 12 x 768 DiT-style size of Meta's text example).
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 2048,
        "max_position_embeddings": 1024,
    },
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class DFMConfig(PretrainedConfig):
    """Configuration of :class:`DFMForMaskedGeneration`, a bidirectional transformer denoiser ``p_{1|t}(x1 | x_t)``.

    Args:
        vocab_size: number of token ids (including the mask token, when there is one).
        hidden_size: width of the residual stream; divisible by ``num_attention_heads`` unless ``head_dim`` is given.
        num_hidden_layers: number of transformer layers.
        num_attention_heads: query heads.
        intermediate_size: width of the gated SiLU MLP.
        max_position_embeddings: longest accepted sequence (and largest position id + 1).
        rope_theta: base wavelength of the rotary position embeddings.
        num_key_value_heads: key/value heads (grouped-query attention: each key/value head serves
            ``num_attention_heads / num_key_value_heads`` query heads, which must be an integer). ``None`` means
            ``num_attention_heads`` (plain multi-head attention); the resolved number is stored.
        attention_bias: learned biases on the query / key / value projections (none on the output projection: the
            Qwen2 / Dream convention).
        head_dim: width of one attention head; ``None`` means ``hidden_size // num_attention_heads`` (the resolved
            number is stored). It must be even (rotary). Where given, ``q_proj`` maps ``hidden_size`` to
            ``num_attention_heads * head_dim`` and ``o_proj`` maps it back.
        logits_shift: the output head reads the hidden state at position ``i - 1`` to predict token ``i`` (position 0
            reads its own): the convention of Dream / DiffuCoder and of causal LMs adapted to diffusion. The logits at
            ``i`` still parametrise ``p_{1|t}(x^i | x_t)``; the shift is internal to the model.
        time_conditioning: add adaLN-Zero time modulation (DiT); ``False`` builds no time parameters and ignores ``t``
            (enough for the mask source, whose posterior does not depend on ``t``).
        mask_token_id: id of the ``[MASK]`` source token, or ``None`` (e.g. a uniform-source model).
        pad_token_id, eos_token_id, bos_token_id: special token ids (``None`` or ids in ``[0, vocab_size)``).
        tie_word_embeddings: tie the output head to the input embeddings.
        hidden_dropout: dropout on the outputs of the attention and MLP sublayers.
        attention_dropout: dropout on the attention probabilities.
        initializer_range: standard deviation of the normal weight initialisation.
        rms_norm_eps: epsilon of the RMS norms.
        loss_type: ``"ce"`` (cross-entropy on the posterior) or ``"generalized_kl"`` (Meta's mixture-path
            generalized KL; needs ``kappa_rate`` in ``forward``).

    Use :meth:`from_preset` for the ``tiny`` / ``small`` / ``base`` sizes of :data:`DFM_PRESETS`.
    """

    model_type = "dfm"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 2048,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        time_conditioning: bool = False,
        mask_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        eos_token_id: Optional[Union[int, list[int]]] = None,
        bos_token_id: Optional[int] = None,
        tie_word_embeddings: bool = True,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        loss_type: str = "ce",
        num_key_value_heads: Optional[int] = None,
        attention_bias: bool = False,
        head_dim: Optional[int] = None,
        logits_shift: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.time_conditioning = time_conditioning
        self.mask_token_id = mask_token_id
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.loss_type = loss_type
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.attention_bias = attention_bias
        self.head_dim = head_dim
        self.logits_shift = logits_shift
        self._validate_sizes()  # before the base class: its own validators divide by these
        # Special ids and tying go through the base class so that both transformers 4.x and 5.x store them.
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=bos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate()

    def _validate_sizes(self) -> None:
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{key}` must be a positive integer, got {value!r}.")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                    f"({self.num_attention_heads}), or give `head_dim` explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        elif not _is_int(self.head_dim) or self.head_dim < 1:
            raise ValueError(f"`head_dim` must be None or a positive even integer, got {self.head_dim!r}.")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"`head_dim` (head dim {self.head_dim}) must be even for rotary embeddings; change `head_dim`, "
                f"`hidden_size` ({self.hidden_size}) or `num_attention_heads` ({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads}); accepted `num_key_value_heads`: None or a divisor of "
                f"{self.num_attention_heads}."
            )

    def _validate(self) -> None:
        self._validate_sizes()
        if not _is_number(self.rope_theta) or self.rope_theta <= 0:
            raise ValueError(f"`rope_theta` must be a finite number > 0, got {self.rope_theta!r}.")
        for key in ("time_conditioning", "tie_word_embeddings", "attention_bias", "logits_shift"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"`{key}` must be True or False, got {value!r}.")
        for key in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, key, None)
            values = value if key == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
            for item in values:
                if item is not None and (not _is_int(item) or not 0 <= item < self.vocab_size):
                    raise ValueError(
                        f"`{key}` must be None or an integer in [0, vocab_size={self.vocab_size}), got {value!r}."
                    )
        for key in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{key}` must be a number in [0, 1), got {value!r}.")
        for key in ("initializer_range", "rms_norm_eps"):
            value = getattr(self, key)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"`{key}` must be a finite number > 0, got {value!r}.")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}.")

    @classmethod
    def from_preset(cls, name: str, tokenizer: Any = None, **overrides: Any) -> DFMConfig:
        """Build a config from a size preset of :data:`DFM_PRESETS` (``"tiny"``, ``"small"`` or ``"base"``).

        With a ``tokenizer``, ``vocab_size = len(tokenizer)`` and the mask / pad / eos / bos ids are read from it
        (it must have a mask token). ``overrides`` are applied last, e.g. ``time_conditioning=True``.
        """
        if name not in DFM_PRESETS:
            raise ValueError(f"`name` must be one of {list(DFM_PRESETS)}, got {name!r}.")
        kwargs: dict[str, Any] = dict(DFM_PRESETS[name])
        if tokenizer is not None:
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
            if mask_token_id is None:
                raise ValueError(
                    "`tokenizer` has no mask token; add one first, e.g. "
                    "`tokenizer.add_special_tokens({'mask_token': '[MASK]'})`."
                )
            kwargs.update(
                vocab_size=len(tokenizer),
                mask_token_id=mask_token_id,
                pad_token_id=getattr(tokenizer, "pad_token_id", None),
                eos_token_id=getattr(tokenizer, "eos_token_id", None),
                bos_token_id=getattr(tokenizer, "bos_token_id", None),
            )
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["DFMConfig", "DFM_PRESETS", "LOSS_TYPES"]
