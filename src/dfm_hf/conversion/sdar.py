"""SDAR checkpoints (JetAstra/SDAR, ``model_type: "sdar"``): Qwen3 tensor names and body (no biases, an RMS norm over
``head_dim`` on queries and keys before the rotary, ``qk_norm=True``), block-causal attention with the config's
``block_size`` (blocks from position 0), position ``i`` predicts token ``i`` (``logits_shift=False``)."""

from __future__ import annotations

from typing import Any

from ..models.configuration_dfm import DFMConfig
from .dream import dream_tensor_names, qwen_body_fields
from .families import _check_values, _refuse, _require, _special_ids

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
    fields = qwen_body_fields(config, family)
    head_dim = config.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    ids = _special_ids(config, mask_token_id=SDAR_MASK_TOKEN_ID, eos_token_id=SDAR_EOS_TOKEN_ID)
    return dict(
        **fields,
        head_dim=int(head_dim),
        attention_bias=False,
        qk_norm=True,
        logits_shift=False,
        block_size=block_size,
        **ids,
    )


def sdar_tensor_names(config: DFMConfig) -> dict[str, str]:
    """SDAR tensor name -> our parameter name (Qwen3's names are ours), for every tensor an SDAR checkpoint holds."""
    return dream_tensor_names(config)
