"""LLaDA2.x checkpoints (inclusionAI LLaDA2.0 / LLaDA2.1, ``model_type: "llada2_moe"``, ``LLaDA2MoeModelLM``): a
sparse mixture-of-experts body (:mod:`dfm_hf.models.moe`), q/k RMS norms, RoPE on ``partial_rotary_factor`` of each
head, block-causal attention in blocks of 32 from position 0, position ``i`` predicts token ``i``
(``logits_shift=False``).

The fused ``attention.query_key_value`` weight holds the query, key and value rows stacked in that order
(``[heads, kv_heads, kv_heads] x head_dim``): it is cut into our ``q_proj`` / ``k_proj`` / ``v_proj`` as it is read.
"""

from __future__ import annotations

from typing import Any

from ..models.configuration_dfm import DFMConfig
from .families import _check_values, _refuse, _require, _rope_settings, _special_ids

#: Special ids of the released LLaDA2 checkpoints (``<|mask|>``, ``<|endoftext|>``), used when the config lacks them.
LLADA2_MASK_TOKEN_ID = 156895
LLADA2_EOS_TOKEN_ID = 156892
#: The block length LLaDA2 is trained and sampled with (its ``generate``'s ``block_length``), used when the config
#: has no ``block_size``.
LLADA2_BLOCK_SIZE = 32
#: LLaDA2's own default ``partial_rotary_factor`` (its configuration class), used when the config lacks it.
LLADA2_PARTIAL_ROTARY_FACTOR = 0.5

_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "attention.dense.weight": "self_attn.o_proj.weight",
    "attention.query_layernorm.weight": "self_attn.q_norm.weight",
    "attention.key_layernorm.weight": "self_attn.k_norm.weight",
}
_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def llada2_config_to_dfm(config: dict[str, Any]) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for a LLaDA2.x ``config.json`` dict.

    The q/k norms are always built (LLaDA2's modeling applies them whatever ``use_qk_norm`` says), and the chosen
    experts' weights are normalised exactly when ``num_experts_per_tok > 1`` (its router does so whatever
    ``norm_topk_prob`` says); ``norm_head``, ``router_dtype`` (the router runs in float32) and the dropout and
    training keys are not read by its forward either. ``block_size`` defaults to 32. Refused, naming the key:
    activations other than SiLU, q/k/v or output biases (``use_qkv_bias``, ``use_bias``, the latter ``True`` by
    default in LLaDA2's configuration class), a sliding window, router score functions other than sigmoid, and
    multi-token-prediction layers.
    """
    family = "LLaDA2"
    _check_values(
        config,
        family,
        {
            "hidden_act": ("silu",),
            "use_qkv_bias": (False,),
            "use_sliding_window": (False, None),
            "score_function": ("sigmoid", None),
            "num_nextn_predict_layers": (0, None),
        },
    )
    if config.get("use_bias", True) is not False:
        raise _refuse(family, "use_bias", config.get("use_bias", True), "False (no bias on `attention.dense`)")
    heads = int(_require(config, "num_attention_heads", family))
    hidden = int(_require(config, "hidden_size", family))
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    partial = config.get("partial_rotary_factor", LLADA2_PARTIAL_ROTARY_FACTOR)
    max_positions = int(_require(config, "max_position_embeddings", family))
    whole = {k: v for k, v in config.items() if k != "partial_rotary_factor"}
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(whole.get(key), dict):
            inner = whole[key].get("partial_rotary_factor")
            if inner is not None and inner != partial:
                raise _refuse(family, f"{key}.partial_rotary_factor", inner, f"{partial} (`partial_rotary_factor`)")
            whole[key] = {k: v for k, v in whole[key].items() if k != "partial_rotary_factor"}
    rope_parameters, max_positions = _rope_settings(whole, family, max_positions)
    rope_parameters["partial_rotary_factor"] = float(partial)
    block_size = config.get("block_size", LLADA2_BLOCK_SIZE)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise _refuse(family, "block_size", block_size, "an integer >= 1")
    moe: dict[str, Any] = {}
    if config.get("num_experts") is not None:
        top_k = int(_require(config, "num_experts_per_tok", family))
        moe = dict(
            num_experts=int(config["num_experts"]),
            num_experts_per_tok=top_k,
            moe_intermediate_size=int(_require(config, "moe_intermediate_size", family)),
            num_shared_experts=int(config.get("num_shared_experts") or 0),
            first_k_dense_replace=int(config.get("first_k_dense_replace") or 0),
            n_group=int(_require(config, "n_group", family)),
            topk_group=int(_require(config, "topk_group", family)),
            routed_scaling_factor=float(_require(config, "routed_scaling_factor", family)),
            norm_topk_prob=top_k > 1,
        )
    ids = _special_ids(config, mask_token_id=LLADA2_MASK_TOKEN_ID, eos_token_id=LLADA2_EOS_TOKEN_ID)
    return dict(
        vocab_size=int(_require(config, "vocab_size", family)),
        hidden_size=hidden,
        num_hidden_layers=int(_require(config, "num_hidden_layers", family)),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate_size=int(_require(config, "intermediate_size", family)),
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=False,
        qk_norm=True,
        logits_shift=False,
        block_size=block_size,
        **moe,
        **ids,
    )


def llada2_tensor_names(config: DFMConfig) -> dict[str, Any]:
    """LLaDA2 tensor name -> our parameter name, or the ``(q, k, v)`` names a fused ``query_key_value`` fills, for
    every tensor a LLaDA2 checkpoint of ``config`` must hold (``mlp.gate.expert_bias`` included)."""
    names: dict[str, Any] = {
        "model.word_embeddings.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.norm.weight",
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.num_hidden_layers):
        source, ours = f"model.layers.{i}.", f"model.layers.{i}."
        names[f"{source}attention.query_key_value.weight"] = tuple(
            f"{ours}self_attn.{p}_proj.weight" for p in ("q", "k", "v")
        )
        names.update({source + k: ours + v for k, v in _LAYER_NAMES.items()})
        mlps = [""]
        if config.num_experts is not None and i >= config.first_k_dense_replace:
            names[f"{source}mlp.gate.weight"] = f"{ours}mlp.gate.weight"
            names[f"{source}mlp.gate.expert_bias"] = f"{ours}mlp.gate.expert_bias"
            mlps = [f"experts.{e}." for e in range(config.num_experts)]
            if config.num_shared_experts:
                mlps.append("shared_experts.")
        for mlp in mlps:
            names.update({f"{source}mlp.{mlp}{p}.weight": f"{ours}mlp.{mlp}{p}.weight" for p in _MLP_NAMES})
    return names
