"""LLaDA checkpoints (``model_type: "llada"``): Llama-like blocks under OLMo-style tensor names, bidirectional
attention, position ``i`` predicts token ``i`` (``logits_shift=False``)."""

from __future__ import annotations

import re
from typing import Any, Optional

from ..models.configuration_dfm import DFMConfig
from .families import _check_values, _refuse, _require, _rope_settings, _special_ids

#: Special ids of the released LLaDA checkpoints, used when their ``config.json`` does not name them.
LLADA_MASK_TOKEN_ID = 126336
LLADA_EOS_TOKEN_ID = 126081

# LLaDA block submodule -> ours (LLaDA's `ff_proj` is the SiLU branch: `ff_out(act(ff_proj(x)) * up_proj(x))`)
_LLADA_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
_LLADA_TOP_NAMES = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_LLADA_BLOCK_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.([a-z_]+)\.weight$")


def llada_config_to_dfm(config: dict[str, Any]) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for a LLaDA ``config.json`` dict (dense ``block_type: "llama"`` models only).

    ``vocab_size`` is LLaDA's ``embedding_size`` (the real number of embedding and head rows, which may exceed its
    ``vocab_size``); the FFN width is ``mlp_hidden_size`` (``mlp_ratio * d_model`` only when it is absent, as LLaDA
    does). Refused: MoE variants (LLaDA-MoE ships ``model_type: "llada"`` with MoE keys), other block types, biases,
    non-RMS or affine-free layer norms, q/k norms, activations other than SiLU, ALiBi or learned positions, rope
    scaling, input-embedding scaling, logit scaling, block groups, q/k/v clipping and embedding dropout.
    """
    family = "LLaDA"
    moe_keys = sorted(k for k in config if "expert" in k or k.startswith("moe") or k in ("num_experts", "router_aux"))
    if moe_keys or ("d_model" not in config and "hidden_size" in config):
        raise ValueError(
            f"{family} config: this is a mixture-of-experts checkpoint (LLaDA-MoE; keys "
            f"{moe_keys or ['hidden_size']}), which we do not implement; accepted: the dense LLaDA models "
            "(`d_model`, `block_type: 'llama'`)."
        )
    if config.get("block_type") != "llama":
        raise _refuse(family, "block_type", config.get("block_type"), "'llama'")
    _check_values(
        config,
        family,
        {
            "include_bias": (False,),
            "include_qkv_bias": (False, None),
            "bias_for_layer_norm": (False, None),
            "layer_norm_type": ("rms",),
            "layer_norm_with_affine": (True,),
            "attention_layer_norm": (False,),
            "activation_type": ("silu",),
            "alibi": (False,),
            "rope": (True,),
            "input_emb_norm": (False,),
            "scale_logits": (False,),
            "block_group_size": (1,),
            "clip_qkv": (None,),
            "embedding_dropout": (0, 0.0),
        },
    )
    for key in ("layer_norm_type", "activation_type", "rope"):
        if key not in config:  # LLaDA's own defaults differ for these: a config must state them
            _require(config, key, family)
    d_model = _require(config, "d_model", family)
    n_heads = _require(config, "n_heads", family)
    n_kv_heads = config.get("n_kv_heads")
    if n_kv_heads is None:
        n_kv_heads = 1 if config.get("multi_query_attention") else n_heads
    mlp_hidden = config.get("mlp_hidden_size")
    if mlp_hidden is None:
        mlp_hidden = _require(config, "mlp_ratio", family) * d_model
    vocab = _require(config, "vocab_size", family)
    rows = config.get("embedding_size") or vocab
    if rows < vocab:
        raise ValueError(f"{family} config: `embedding_size` ({rows}) must be at least `vocab_size` ({vocab}).")
    ids = _special_ids(config, eos_token_id=LLADA_EOS_TOKEN_ID if rows > LLADA_EOS_TOKEN_ID else None)
    if ids["mask_token_id"] is None:
        if rows <= LLADA_MASK_TOKEN_ID:
            raise ValueError(
                f"{family} config: `mask_token_id` is missing and the default {LLADA_MASK_TOKEN_ID} "
                f"does not fit the {rows} embedding rows; add `mask_token_id` to config.json."
            )
        ids["mask_token_id"] = LLADA_MASK_TOKEN_ID
    max_positions = int(_require(config, "max_sequence_length", family))
    rope_parameters, max_positions = _rope_settings(config, family, max_positions, scaling=False)  # LLaDA has none
    return dict(
        vocab_size=int(rows),
        hidden_size=int(d_model),
        num_hidden_layers=int(_require(config, "n_layers", family)),
        num_attention_heads=int(n_heads),
        num_key_value_heads=int(n_kv_heads),
        intermediate_size=int(mlp_hidden),
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        attention_dropout=float(config.get("attention_dropout", 0.0) or 0.0),
        hidden_dropout=float(config.get("residual_dropout", 0.0) or 0.0),
        attention_bias=False,
        logits_shift=False,
        **ids,
    )


def llada_to_dfm_name(name: str) -> Optional[str]:
    """Our parameter name for a LLaDA tensor name, or None when it is not part of the format."""
    if name in _LLADA_TOP_NAMES:
        return _LLADA_TOP_NAMES[name]
    match = _LLADA_BLOCK_RE.match(name)
    if match and match.group(2) in _LLADA_BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_LLADA_BLOCK_NAMES[match.group(2)]}.weight"
    return None


def llada_tensor_names(config: DFMConfig) -> dict[str, str]:
    """LLaDA tensor name -> our parameter name, for every tensor a LLaDA checkpoint of ``config`` must hold."""
    names = ["model.transformer.wte.weight", "model.transformer.ln_f.weight"]
    if not config.tie_word_embeddings:
        names.append("model.transformer.ff_out.weight")
    layers = range(config.num_hidden_layers)
    names += [f"model.transformer.blocks.{i}.{b}.weight" for i in layers for b in _LLADA_BLOCK_NAMES]
    return {name: llada_to_dfm_name(name) for name in names}
