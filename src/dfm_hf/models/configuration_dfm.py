"""Configuration of the Discrete Flow Matching denoiser (``model_type = "dfm"``).

This file is self-contained (it imports only ``transformers``): it is copied next to the weights by
``save_pretrained`` and loaded as remote code with ``trust_remote_code=True``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Union

from transformers import PretrainedConfig

DEFAULT_ROPE_THETA = 10000.0
#: ``rope_parameters["rope_type"]`` -> (required keys, optional keys) besides ``rope_type``, ``rope_theta`` and
#: ``partial_rotary_factor`` (which must be 1). The names and meanings are those of transformers' ``RopeParameters``;
#: ``dynamic`` may also carry ``original_max_position_embeddings``, the length beyond which it rescales (default:
#: ``max_position_embeddings``, where it never does, longer inputs being refused).
ROPE_PARAMETER_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ("original_max_position_embeddings",)),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
    "llama3": (("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"), ()),
}
ROPE_TYPES = tuple(ROPE_PARAMETER_KEYS)

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


def check_block_size(block_size: Any) -> Optional[int]:
    """``block_size`` itself when it is None (full attention) or an integer >= 1 (block diffusion); raises
    ``ValueError`` naming it otherwise."""
    if block_size is not None and (not _is_int(block_size) or block_size < 1):
        raise ValueError(
            f"`block_size` must be None (full attention) or an integer >= 1 (block diffusion), got {block_size!r}."
        )
    return block_size


def _standard_rope_parameters(
    rope_parameters: Any, rope_theta: Any, rope_scaling: Any, max_position_embeddings: int
) -> dict[str, Any]:
    """A copy of ``rope_parameters`` (or of its legacy name ``rope_scaling``) with ``rope_type`` (legacy ``type``;
    default ``"default"``) and ``rope_theta`` (the argument, else :data:`DEFAULT_ROPE_THETA`) filled in, and
    ``original_max_position_embeddings`` defaulting to ``max_position_embeddings`` where the type needs it."""
    if rope_scaling is not None:
        if rope_parameters is not None:
            raise ValueError("Give `rope_parameters` only: `rope_scaling` is its legacy name, not a second setting.")
        rope_parameters = rope_scaling
    if rope_parameters is None:
        rope_parameters = {}
    if not isinstance(rope_parameters, dict):
        raise ValueError(
            f"`rope_parameters` must be None or a dict with a `rope_type` in {list(ROPE_TYPES)}, got "
            f"{rope_parameters!r}."
        )
    parameters = copy.deepcopy(rope_parameters)
    legacy_type = parameters.pop("type", None)
    if legacy_type is not None and parameters.setdefault("rope_type", legacy_type) != legacy_type:
        raise ValueError(
            f"`rope_parameters` has `rope_type` {parameters['rope_type']!r} and `type` {legacy_type!r} "
            "(its legacy name): give `rope_type` only."
        )
    parameters.setdefault("rope_type", "default")
    if rope_theta is not None:
        if "rope_theta" in parameters and parameters["rope_theta"] != rope_theta:
            raise ValueError(
                f"`rope_theta` ({rope_theta!r}) differs from `rope_parameters['rope_theta']` "
                f"({parameters['rope_theta']!r}); give it once (in `rope_parameters`)."
            )
        parameters["rope_theta"] = rope_theta
    parameters.setdefault("rope_theta", DEFAULT_ROPE_THETA)
    rope_type = parameters["rope_type"]
    required = ROPE_PARAMETER_KEYS.get(rope_type, ((),))[0] if isinstance(rope_type, str) else ()
    if "original_max_position_embeddings" in required:
        parameters.setdefault("original_max_position_embeddings", max_position_embeddings)
    return parameters


def _check_rope_parameters(parameters: dict[str, Any], head_dim: int) -> None:
    """Raise ``ValueError`` naming the key unless ``parameters`` (standardised) is a RoPE we compute."""
    rope_type = parameters["rope_type"]
    if not isinstance(rope_type, str) or rope_type not in ROPE_PARAMETER_KEYS:
        raise ValueError(f"`rope_parameters['rope_type']` must be one of {list(ROPE_TYPES)}, got {rope_type!r}.")
    required, optional = ROPE_PARAMETER_KEYS[rope_type]
    accepted = ("rope_type", "rope_theta", "partial_rotary_factor") + required + optional
    unknown = sorted(set(parameters) - set(accepted))
    if unknown:
        raise ValueError(
            f"`rope_parameters` keys {unknown} are not used by rope_type {rope_type!r}; accepted keys: "
            f"{list(accepted)}."
        )
    missing = [key for key in required if parameters.get(key) is None]
    if missing:
        raise ValueError(f"`rope_parameters` with rope_type {rope_type!r} needs {missing}; required: {list(required)}.")

    def number(key: str, low: Optional[float] = None, inclusive: bool = False) -> None:
        value = parameters.get(key)
        if value is None and key != "rope_theta":
            return
        if not _is_number(value) or (low is not None and (value < low or (value == low and not inclusive))):
            bound = "" if low is None else f" >= {low}" if inclusive else f" > {low}"
            raise ValueError(f"`rope_parameters['{key}']` must be a finite number{bound}, got {value!r}.")

    number("rope_theta", 0.0)
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"`rope_parameters['partial_rotary_factor']` must be 1.0 (the whole head is rotated), got "
            f"{parameters['partial_rotary_factor']!r}."
        )
    number("factor", 1.0, inclusive=True)
    for key in ("attention_factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        number(key, 0.0)
    for key in ("mscale", "mscale_all_dim"):
        number(key)
    original = parameters.get("original_max_position_embeddings")
    if original is not None and (not _is_int(original) or original < 1):
        raise ValueError(
            f"`rope_parameters['original_max_position_embeddings']` must be a positive integer, got {original!r}."
        )
    if parameters.get("truncate") is not None and not isinstance(parameters["truncate"], bool):
        raise ValueError(f"`rope_parameters['truncate']` must be True, False or None, got {parameters['truncate']!r}.")
    if rope_type == "llama3" and not parameters["high_freq_factor"] > parameters["low_freq_factor"]:
        raise ValueError(
            f"`rope_parameters['high_freq_factor']` ({parameters['high_freq_factor']}) must be greater than "
            f"`rope_parameters['low_freq_factor']` ({parameters['low_freq_factor']})."
        )
    for key in ("short_factor", "long_factor"):
        value = parameters.get(key)
        if value is not None and (
            not isinstance(value, (list, tuple))
            or len(value) != head_dim // 2
            or not all(_is_number(v) and v > 0 for v in value)
        ):
            raise ValueError(
                f"`rope_parameters['{key}']` must be a list of head_dim / 2 = {head_dim // 2} finite numbers > 0, "
                f"got {value!r}."
            )


class DFMConfig(PretrainedConfig):
    """Configuration of :class:`DFMForMaskedGeneration`, a bidirectional transformer denoiser ``p_{1|t}(x1 | x_t)``.

    Args:
        vocab_size: number of token ids (including the mask token, when there is one).
        hidden_size: width of the residual stream; divisible by ``num_attention_heads`` unless ``head_dim`` is given.
        num_hidden_layers: number of transformer layers.
        num_attention_heads: query heads.
        intermediate_size: width of the gated SiLU MLP.
        max_position_embeddings: longest accepted sequence (and largest position id + 1).
        rope_theta: base wavelength of the rotary position embeddings: ``rope_parameters["rope_theta"]``, read and
            written through this name too (``None``: the value in ``rope_parameters``, else 10000). Configs saved
            with ``rope_theta`` only load as ``rope_parameters={"rope_type": "default", "rope_theta": ...}``.
        num_key_value_heads: key/value heads (grouped-query attention: each key/value head serves
            ``num_attention_heads / num_key_value_heads`` query heads, which must be an integer). ``None`` means
            ``num_attention_heads`` (plain multi-head attention); the resolved number is stored.
        attention_bias: learned biases on the query / key / value projections (none on the output projection: the
            Qwen2 / Dream convention).
        head_dim: width of one attention head; ``None`` means ``hidden_size // num_attention_heads`` (the resolved
            number is stored). It must be even (rotary). Where given, ``q_proj`` maps ``hidden_size`` to
            ``num_attention_heads * head_dim`` and ``o_proj`` maps it back.
        rope_parameters: the rotary embedding, as transformers' ``RopeParameters`` dict: ``rope_type`` one of
            :data:`ROPE_TYPES` (``"default"``, ``"linear"``, ``"dynamic"``, ``"yarn"``, ``"llama3"``,
            ``"longrope"``) with the keys :data:`ROPE_PARAMETER_KEYS` lists for it, e.g. ``{"rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings":
            8192}``. ``None`` means plain RoPE. The frequencies and the cos/sin scaling are transformers' (its
            ``ROPE_INIT_FUNCTIONS``); the length-dependent types (``dynamic``, ``longrope``) use the length of the
            sequence being denoised, the whole canvas with a key/value cache. ``rope_scaling`` is accepted as its
            legacy name.
        logits_shift: the output head reads the hidden state at position ``i - 1`` to predict token ``i`` (position 0
            reads its own): the convention of Dream / DiffuCoder and of causal LMs adapted to diffusion. The logits at
            ``i`` still parametrise ``p_{1|t}(x^i | x_t)``; the shift is internal to the model.
        block_size: ``None`` (full bidirectional attention) or ``K >= 1``: block diffusion. The query at position
            ``i`` attends to the key at position ``j`` when ``j // K <= i // K`` (its own block, bidirectionally, and
            every earlier block), blocks counted from position 0 of the row (the prompt included; padding does not
            count). Generation then runs block by block with an exact key/value cache of the finished blocks (a
            ``DynamicCache``, appended to and cropped); ``K = 1`` is a causal LM.
        time_conditioning: add adaLN-Zero time modulation (DiT); ``False`` builds no time parameters and ignores ``t``
            (enough for the mask source, whose posterior does not depend on ``t``).
        mask_token_id: id of the ``[MASK]`` source token, or ``None`` (e.g. a uniform-source model).
        pad_token_id, eos_token_id, bos_token_id: special token ids (``None`` or ids in ``[0, vocab_size)``).
        tie_word_embeddings: tie the output head to the input embeddings.
        hidden_dropout: dropout on the outputs of the attention and MLP sublayers.
        attention_dropout: dropout on the attention probabilities.
        initializer_range: standard deviation of the normal weight initialisation.
        rms_norm_eps: epsilon of the RMS norms.

    The training loss is not a model setting: the training code chooses it. A ``loss_type`` key in ``config.json`` is
    dropped on load, not stored (transformers' models use that attribute name for their own loss lookup).

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
        rope_theta: Optional[float] = None,
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
        num_key_value_heads: Optional[int] = None,
        attention_bias: bool = False,
        head_dim: Optional[int] = None,
        logits_shift: bool = False,
        rope_parameters: Optional[dict[str, Any]] = None,
        block_size: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = _standard_rope_parameters(
            rope_parameters, rope_theta, kwargs.pop("rope_scaling", None), max_position_embeddings
        )
        self.time_conditioning = time_conditioning
        self.mask_token_id = mask_token_id
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        kwargs.pop("loss_type", None)  # a training setting, not a model setting: dropped
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.attention_bias = attention_bias
        self.head_dim = head_dim
        self.logits_shift = logits_shift
        self.block_size = block_size
        self._validate_sizes()  # before the base class: its own validators divide by these
        _check_rope_parameters(self.rope_parameters, self.head_dim)  # before the base class's, which only warns
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
        _check_rope_parameters(self.rope_parameters, self.head_dim)
        for key in ("time_conditioning", "tie_word_embeddings", "attention_bias", "logits_shift"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"`{key}` must be True or False, got {value!r}.")
        check_block_size(self.block_size)
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

    def _validate_dynamic_rope_parameters(self, rope_parameters: dict[str, Any], ignore_keys: Any = None) -> None:
        """transformers' check of a ``dynamic`` RoPE, which also carries ``original_max_position_embeddings`` here."""
        ignore_keys = set(ignore_keys or ()) | {"original_max_position_embeddings"}
        super()._validate_dynamic_rope_parameters(rope_parameters, ignore_keys=ignore_keys)

    @property
    def rope_theta(self) -> float:
        """The base wavelength of the rotary embeddings, ``rope_parameters["rope_theta"]``."""
        return self.rope_parameters.get("rope_theta", DEFAULT_ROPE_THETA)

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        parameters = {**self.rope_parameters, "rope_theta": value}
        _check_rope_parameters(parameters, self.head_dim)
        self.rope_parameters = parameters

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


__all__ = ["DEFAULT_ROPE_THETA", "DFMConfig", "DFM_PRESETS", "ROPE_PARAMETER_KEYS", "ROPE_TYPES", "check_block_size"]
