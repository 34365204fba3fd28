"""Dream / DiffuCoder checkpoints (``model_type: "Dream"``): Qwen2 tensor names, bidirectional attention, **shifted**
logits (the output at ``i - 1`` predicts token ``i``, ``logits_shift=True``)."""

from __future__ import annotations

from typing import Any

from ..models.configuration_dfm import DFMConfig
from .families import _check_values, _require, _rope_settings, _special_ids

#: Special ids of the released Dream checkpoints, used when their ``config.json`` does not name them.
DREAM_MASK_TOKEN_ID = 151666
DREAM_PAD_TOKEN_ID = 151643
#: The tensor Dream checkpoints hold when their attention has q/k/v biases (they all do so far).
DREAM_QKV_BIAS_TENSOR = "model.layers.0.self_attn.q_proj.bias"

# per-layer tensor names, shared by Qwen2 / Dream checkpoints and our own models
_LAYER_NAMES = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_QKV_BIAS_NAMES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
_QK_NORM_NAMES = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # Qwen3 / SDAR


def dream_config_to_dfm(config: dict[str, Any], has_qkv_bias: bool = True) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for a Dream / DiffuCoder ``config.json`` dict (Qwen2 keys).

    Dream's attention always has q/k/v biases whatever its config says (its ``attention_bias`` key is not read by its
    modeling code), so ``has_qkv_bias`` is decided from the checkpoint (does it hold ``q_proj.bias``?). The head width
    is ``hidden_size / num_attention_heads`` (Dream ignores ``head_dim``). Its ``rope_scaling`` (Qwen2's, through
    transformers' rope functions) becomes ``rope_parameters`` (see ``_rope_settings``). Refused: an enabled sliding
    window, rope types transformers does not define, activations other than SiLU.
    """
    family = "Dream"
    _check_values(config, family, {"hidden_act": ("silu",), "use_sliding_window": (False, None), "use_mrope": (False,)})
    ids = _special_ids(config, mask_token_id=DREAM_MASK_TOKEN_ID, pad_token_id=DREAM_PAD_TOKEN_ID)
    return dict(**qwen_body_fields(config, family), attention_bias=bool(has_qkv_bias), logits_shift=True, **ids)


def qwen_body_fields(config: dict[str, Any], family: str) -> dict[str, Any]:
    """The ``DFMConfig`` keyword arguments every Qwen2 / Qwen3-shaped ``config.json`` states the same way (sizes,
    heads, positions, RoPE, norm epsilon, tying, attention dropout); ``family`` names the checkpoint in errors."""
    heads = int(_require(config, "num_attention_heads", family))
    kv_heads = config.get("num_key_value_heads")
    max_positions = int(_require(config, "max_position_embeddings", family))
    rope_parameters, max_positions = _rope_settings(config, family, max_positions)
    return dict(
        vocab_size=int(_require(config, "vocab_size", family)),
        hidden_size=int(_require(config, "hidden_size", family)),
        num_hidden_layers=int(_require(config, "num_hidden_layers", family)),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads) if kv_heads is not None else heads,
        intermediate_size=int(_require(config, "intermediate_size", family)),
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_dropout=float(config.get("attention_dropout", 0.0) or 0.0),
    )


def dream_tensor_names(config: DFMConfig) -> dict[str, str]:
    """Dream tensor name -> our parameter name (the same names), for every tensor a Dream checkpoint must hold: the
    Qwen2 names, which are ours (with ``config.qk_norm`` also Qwen3's ``q_norm`` / ``k_norm``)."""
    ours = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        ours.append("lm_head.weight")
    per_layer = _LAYER_NAMES + (_QKV_BIAS_NAMES if getattr(config, "attention_bias", False) else ())
    per_layer += _QK_NORM_NAMES if getattr(config, "qk_norm", False) else ()
    ours += [f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in per_layer]
    return {n: n for n in ours}
