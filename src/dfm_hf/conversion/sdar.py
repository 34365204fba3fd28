"""SDAR checkpoints (JetAstra/SDAR, ``model_type: "sdar"``): Qwen3 tensor names and body (no biases, an RMS norm over
``head_dim`` on queries and keys before the rotary, ``qk_norm=True``), block-causal attention with the config's
``block_size`` (blocks from position 0), position ``i`` predicts token ``i`` (``logits_shift=False``)."""

from __future__ import annotations

from typing import Any

from ..models.configuration_dfm import DFMConfig
from .dream import dream_tensor_names
from .families import _check_values, _refuse, _require, _rope_settings, _special_ids

#: Special ids of the released SDAR checkpoints (``<|MASK|>``, ``<|endoftext|>``), used when their config lacks them.
SDAR_MASK_TOKEN_ID = 151669
SDAR_EOS_TOKEN_ID = 151643
#: Mixture-of-experts keys (SDAR-30B-A3B: Qwen3-MoE experts, a softmax router), which we do not convert.
_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")


def sdar_config_to_dfm(config: dict[str, Any]) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for an SDAR ``config.json`` dict (Qwen3 keys plus ``block_size`` and
    ``mask_token_id``).

    The head width is ``head_dim`` (Qwen3 states it; ``hidden_size / num_attention_heads`` when absent). Keys used
    only by SDAR's training code (``fuse_cross_entropy``, ``attn_implementation``, ``ep_size``, ``use_deepep``...)
    are ignored. Refused, naming the key: ``attention_bias`` (Qwen3 puts it on ``o_proj`` too, which we do not have),
    an enabled sliding window, activations other than SiLU, mixture-of-experts keys, and a missing ``block_size``.
    """
    family = "SDAR"
    _check_values(
        config, family, {"hidden_act": ("silu",), "use_sliding_window": (False, None), "attention_bias": (False,)}
    )
    for key in _MOE_KEYS:
        if config.get(key):
            raise _refuse(family, key, config[key], "absent or 0 (dense SDAR models; the MoE ones are not converted)")
    block_size = _require(config, "block_size", family)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise _refuse(family, "block_size", block_size, "an integer >= 1")
    heads = int(_require(config, "num_attention_heads", family))
    hidden = int(_require(config, "hidden_size", family))
    kv_heads = config.get("num_key_value_heads")
    head_dim = config.get("head_dim") or hidden // heads
    ids = _special_ids(config, mask_token_id=SDAR_MASK_TOKEN_ID, eos_token_id=SDAR_EOS_TOKEN_ID)
    max_positions = int(_require(config, "max_position_embeddings", family))
    rope_parameters, max_positions = _rope_settings(config, family, max_positions)
    return dict(
        vocab_size=int(_require(config, "vocab_size", family)),
        hidden_size=hidden,
        num_hidden_layers=int(_require(config, "num_hidden_layers", family)),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads) if kv_heads is not None else heads,
        head_dim=int(head_dim),
        intermediate_size=int(_require(config, "intermediate_size", family)),
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_dropout=float(config.get("attention_dropout", 0.0) or 0.0),
        attention_bias=False,
        qk_norm=True,
        logits_shift=False,
        block_size=block_size,
        **ids,
    )


def sdar_tensor_names(config: DFMConfig) -> dict[str, str]:
    """SDAR tensor name -> our parameter name (Qwen3's names are ours), for every tensor an SDAR checkpoint holds."""
    return dream_tensor_names(config)
