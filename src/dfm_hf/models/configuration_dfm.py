"""Configuration of the Discrete Flow Matching denoiser (``model_type = "dfm"``).

This file imports only ``transformers`` and its sibling :mod:`.rope_parameters`: both are copied next to the weights
by ``save_pretrained`` and loaded as remote code with ``trust_remote_code=True``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from transformers import PretrainedConfig

from .rope_parameters import (
    DEFAULT_ROPE_THETA,
    ROPE_PARAMETER_KEYS,
    ROPE_TYPES,
    check_rope_parameters,
    is_int,
    is_number,
    rotary_dim,
    standard_rope_parameters,
)

#: ``body`` values: ``"llama"`` (RMSNorm, gated SiLU MLP, separate q/k/v) and ``"dit"`` (BD3-LM / MDLM's DiT).
BODIES = ("llama", "dit")

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


def check_block_size(block_size: Any) -> Optional[int]:
    """``block_size`` itself when it is None (full attention) or an integer >= 1 (block diffusion); raises
    ``ValueError`` naming it otherwise."""
    if block_size is not None and (not is_int(block_size) or block_size < 1):
        raise ValueError(
            f"`block_size` must be None (full attention) or an integer >= 1 (block diffusion), got {block_size!r}."
        )
    return block_size


def _check_moe(config: Any) -> None:
    """Raise ``ValueError`` naming the key unless the mixture-of-experts keys of ``config`` fit together."""
    if config.num_experts is None:
        for key in ("num_experts_per_tok", "moe_intermediate_size"):
            if getattr(config, key) is not None:
                raise ValueError(f"`{key}` is a setting of the MoE layer: set `num_experts` or leave it None.")
        return
    bounds = {
        "num_experts": (1, None),
        "num_experts_per_tok": (1, config.num_experts),
        "moe_intermediate_size": (1, None),
        "num_shared_experts": (0, None),
        "first_k_dense_replace": (0, config.num_hidden_layers),
        "n_group": (1, config.num_experts),
        "topk_group": (1, config.n_group),
    }
    for key, (low, high) in bounds.items():
        value = getattr(config, key)
        if not is_int(value) or value < low or (high is not None and value > high):
            accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
            raise ValueError(f"`{key}` must be {accepted} with num_experts={config.num_experts}, got {value!r}.")
    group = config.num_experts // config.n_group
    if config.num_experts % config.n_group or (config.topk_group < config.n_group and group < 2):
        raise ValueError(
            f"`n_group` ({config.n_group}) must divide `num_experts` ({config.num_experts}) into groups of at least "
            "2 experts (a group is scored by its best two) unless every group is kept (topk_group = n_group)."
        )
    if config.num_experts_per_tok > config.topk_group * group:
        raise ValueError(
            f"`num_experts_per_tok` ({config.num_experts_per_tok}) exceeds the experts of the `topk_group` "
            f"({config.topk_group}) kept groups ({config.topk_group * group})."
        )
    if not is_number(config.routed_scaling_factor) or config.routed_scaling_factor <= 0:
        raise ValueError(f"`routed_scaling_factor` must be a finite number > 0, got {config.routed_scaling_factor!r}.")
    if not isinstance(config.norm_topk_prob, bool):
        raise ValueError(f"`norm_topk_prob` must be True or False, got {config.norm_topk_prob!r}.")


def _check_body(config: DFMConfig) -> None:
    """Raise ``ValueError`` naming the key unless ``body``, ``cond_dim`` and ``subs_parameterization`` fit."""
    if config.body not in BODIES:
        raise ValueError(f"`body` must be one of {list(BODIES)}, got {config.body!r}.")
    if config.body == "llama":
        if config.cond_dim is not None:
            raise ValueError(
                f"`cond_dim` is a setting of body='dit'; with body='llama' it must be None, got {config.cond_dim!r}."
            )
    else:
        if config.cond_dim is None or not is_int(config.cond_dim) or config.cond_dim < 1:
            raise ValueError(f"`cond_dim` must be a positive integer with body='dit', got {config.cond_dim!r}.")
        if config.tie_word_embeddings:
            raise ValueError("body='dit' has an untied, biased output layer: set `tie_word_embeddings=False`.")
        if config.attention_bias:
            raise ValueError("body='dit' has no q/k/v biases: set `attention_bias=False`.")
    if config.subs_parameterization and config.mask_token_id is None:
        raise ValueError("`subs_parameterization=True` needs a `mask_token_id` (the logit it removes).")


def _check_fim_token_ids(config: Any) -> None:
    """Raise ``ValueError`` unless ``fim_token_ids`` is None or ``{"prefix", "suffix", "middle"}`` -> distinct ids in
    ``[0, vocab_size)``, none of them the mask token."""
    ids = config.fim_token_ids
    if ids is None:
        return
    values = list(ids.values()) if isinstance(ids, dict) else []
    if (
        sorted(ids if isinstance(ids, dict) else ()) != ["middle", "prefix", "suffix"]
        or not all(is_int(v) and 0 <= v < config.vocab_size for v in values)
        or len(set(values)) != 3
        or config.mask_token_id in values
    ):
        raise ValueError(
            "`fim_token_ids` must be None or {'prefix': id, 'suffix': id, 'middle': id} with three distinct ids in "
            f"[0, vocab_size={config.vocab_size}) other than the mask token, got {ids!r}."
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
            ``"longrope"``) with the keys :data:`ROPE_PARAMETER_KEYS` lists for it, and optionally
            ``partial_rotary_factor`` in (0, 1] (LLaDA2: 0.5; only the first ``head_dim * factor`` dimensions of each
            query / key head are rotated, with frequencies over that width; :func:`rotary_dim`), e.g.
            ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}``. ``None`` means plain RoPE. The frequencies and the cos/sin
            scaling are transformers' (its ``ROPE_INIT_FUNCTIONS``); the length-dependent types (``dynamic``,
            ``longrope``) use the length of the sequence being denoised, the whole canvas with a key/value cache.
            ``rope_scaling`` is accepted as its legacy name.
        logits_shift: the output head reads the hidden state at position ``i - 1`` to predict token ``i`` (position 0
            reads its own): the convention of Dream / DiffuCoder and of causal LMs adapted to diffusion. The logits at
            ``i`` still parametrise ``p_{1|t}(x^i | x_t)``; the shift is internal to the model.
        block_size: ``None`` (full bidirectional attention) or ``K >= 1``: block diffusion. The query at position
            ``i`` attends to the key at position ``j`` when ``j // K <= i // K`` (its own block, bidirectionally, and
            every earlier block), blocks counted from position 0 of the row (the prompt included; padding does not
            count). Generation then runs block by block with an exact key/value cache of the finished blocks (a
            ``DynamicCache``, appended to and cropped); ``K = 1`` is a causal LM.
        qk_norm: an RMS norm over ``head_dim`` (learned scale, epsilon ``rms_norm_eps``) on every query and key head,
            before the rotary embedding (Qwen3 / SDAR / LLaDA2): parameters ``self_attn.q_norm.weight`` and
            ``self_attn.k_norm.weight`` of shape ``(head_dim,)``.
        num_experts: ``None`` (a dense MLP in every layer) or ``E``: a sparse mixture-of-experts feed-forward
            (LLaDA2.x; :mod:`.moe`) in layers ``first_k_dense_replace`` and later, with ``E`` routed experts. Its
            keys: ``num_experts_per_tok`` (``k``, experts per token), ``moe_intermediate_size`` (width of each
            expert), ``num_shared_experts`` (the always-on shared MLP is this many experts wide; 0: none),
            ``first_k_dense_replace`` (leading layers with the dense MLP of ``intermediate_size``), ``n_group`` /
            ``topk_group`` (group-limited routing: the experts form ``n_group`` equal groups, each scored by the sum
            of its best two biased scores, and only the best ``topk_group`` groups are eligible),
            ``routed_scaling_factor`` (multiplies the routing weights) and ``norm_topk_prob`` (normalise the
            chosen experts' sigmoid scores to sum to 1). Without ``num_experts``, ``num_experts_per_tok`` and
            ``moe_intermediate_size`` must be None and the other keys are unused.
        time_conditioning: add adaLN-Zero time modulation (DiT); ``False`` builds no time parameters and ignores ``t``
            (enough for the mask source, whose posterior does not depend on ``t``). With ``body="dit"`` the adaLN
            parameters always exist and this chooses what they see: ``True``, BD3-LM / MDLM's noise level
            ``sigma = -log(max(t, 1e-3))`` (``t``: our time, the fraction of clean tokens under a linear kappa;
            their move chance is ``1 - t``, clipped at their log-linear ``sigma_max``); ``False``, ``sigma = 0``
            whatever ``t`` (their ``time_conditioning: false``: the adaLN still receives the embedding of 0).
        mask_token_id: id of the ``[MASK]`` source token, or ``None`` (e.g. a uniform-source model).
        pad_token_id, eos_token_id, bos_token_id: special token ids (``None`` or ids in ``[0, vocab_size)``).
        tie_word_embeddings: tie the output head to the input embeddings.
        hidden_dropout: dropout on the outputs of the attention and MLP sublayers.
        attention_dropout: dropout on the attention probabilities.
        initializer_range: standard deviation of the normal weight initialisation.
        rms_norm_eps: epsilon of the RMS norms.

        body: ``"llama"`` (the layers above) or ``"dit"``: BD3-LM / MDLM's diffusion transformer
            (:mod:`.dit`): bias-free LayerNorms (epsilon 1e-5), bias-free q/k/v/o projections (their fused
            ``attn_qkv`` split on conversion), a biased GELU-tanh MLP of width ``intermediate_size``, adaLN modulation
            of every block and of the final norm from the sigma embedder (``cond_dim`` wide), and a biased, untied
            output layer.
        cond_dim: width of the DiT's conditioning vector (``body="dit"`` only; None otherwise).
        subs_parameterization: MDLM's SUBS output: the mask token's logit is ``-inf`` and a position whose input is
            not the mask token puts all its mass on that input (logit 0 there, ``-inf`` elsewhere).
        fim_token_ids: ``None`` or the fill-in-the-middle control tokens ``{"prefix": id, "suffix": id, "middle":
            id}`` the model was trained with (layout: :mod:`dfm_hf.data.fim`); a block-diffusion model with them
            infills a prompt's one run of mask tokens through that layout.

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
        qk_norm: bool = False,
        num_experts: Optional[int] = None,
        num_experts_per_tok: Optional[int] = None,
        moe_intermediate_size: Optional[int] = None,
        num_shared_experts: int = 0,
        first_k_dense_replace: int = 0,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        norm_topk_prob: bool = True,
        body: str = "llama",
        cond_dim: Optional[int] = None,
        subs_parameterization: bool = False,
        fim_token_ids: Optional[dict[str, int]] = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = standard_rope_parameters(
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
        self.qk_norm = qk_norm
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.num_shared_experts = num_shared_experts
        self.first_k_dense_replace = first_k_dense_replace
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.body = body
        self.cond_dim = cond_dim
        self.subs_parameterization = subs_parameterization
        self.fim_token_ids = fim_token_ids
        self._validate_sizes()  # before the base class: its own validators divide by these
        check_rope_parameters(self.rope_parameters, self.head_dim)  # before the base class's, which only warns
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
            if not is_int(value) or value < 1:
                raise ValueError(f"`{key}` must be a positive integer, got {value!r}.")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                    f"({self.num_attention_heads}), or give `head_dim` explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        elif not is_int(self.head_dim) or self.head_dim < 1:
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
        check_rope_parameters(self.rope_parameters, self.head_dim)
        for key in (
            "time_conditioning",
            "tie_word_embeddings",
            "attention_bias",
            "logits_shift",
            "qk_norm",
            "subs_parameterization",
        ):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"`{key}` must be True or False, got {value!r}.")
        check_block_size(self.block_size)
        _check_moe(self)
        _check_body(self)
        _check_fim_token_ids(self)
        for key in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, key, None)
            values = value if key == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
            for item in values:
                if item is not None and (not is_int(item) or not 0 <= item < self.vocab_size):
                    raise ValueError(
                        f"`{key}` must be None or an integer in [0, vocab_size={self.vocab_size}), got {value!r}."
                    )
        for key in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, key)
            if not is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{key}` must be a number in [0, 1), got {value!r}.")
        for key in ("initializer_range", "rms_norm_eps"):
            value = getattr(self, key)
            if not is_number(value) or value <= 0:
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
        check_rope_parameters(parameters, self.head_dim)
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


__all__ = [
    "BODIES",
    "DEFAULT_ROPE_THETA",
    "DFMConfig",
    "DFM_PRESETS",
    "ROPE_PARAMETER_KEYS",
    "ROPE_TYPES",
    "check_block_size",
    "rotary_dim",
]
