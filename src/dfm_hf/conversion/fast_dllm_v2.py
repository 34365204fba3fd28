"""Fast-dLLM v2 checkpoints (NVlabs/Fast-dLLM ``v2/``, ``model_type: "Fast_dLLM_Qwen"``): a Qwen2.5 body (q/k/v
biases, Qwen2 tensor names), block-causal attention in blocks of ``bd_size`` (from position 0) and **shifted** logits
(the output at ``i - 1`` predicts token ``i``, ``logits_shift=True``). Its sampler's sub-blocks and its
autoregressive first token per block are options of our confidence scheduler (the ``fast-dllm-v2`` presets)."""

from __future__ import annotations

from typing import Any

from ..models.configuration_dfm import DFMConfig
from .dream import dream_tensor_names, qwen_body_fields
from .families import _check_values, _refuse, _special_ids

#: Special ids of the released Fast-dLLM v2 checkpoints (``|<MASK>|`` and the chat stop ``<|im_end|>``), used when
#: their config lacks them.
FAST_DLLM_V2_MASK_TOKEN_ID = 151665
FAST_DLLM_V2_EOS_TOKEN_ID = 151645


def fast_dllm_v2_config_to_dfm(config: dict[str, Any]) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for a Fast-dLLM v2 ``config.json`` dict (Qwen2 keys plus ``bd_size``).

    Its attention always has q/k/v biases (Qwen2's), its block size is ``bd_size`` (32 when absent, its code's
    default) and its mask id ``mask_token_id`` (151665 when absent). Keys its inference code does not read
    (``max_window_layers``, ``layer_types`` without a sliding window...) are ignored. Refused, naming the key: an
    enabled sliding window, activations other than SiLU, a ``bd_size`` that is not a positive integer.
    """
    family = "Fast-dLLM v2"
    _check_values(config, family, {"hidden_act": ("silu",), "use_sliding_window": (False, None)})
    block_size = config.get("bd_size", 32)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise _refuse(family, "bd_size", block_size, "an integer >= 1 (the block size)")
    ids = _special_ids(config, mask_token_id=FAST_DLLM_V2_MASK_TOKEN_ID, eos_token_id=FAST_DLLM_V2_EOS_TOKEN_ID)
    return dict(
        **qwen_body_fields(config, family), attention_bias=True, logits_shift=True, block_size=block_size, **ids
    )


def fast_dllm_v2_tensor_names(config: DFMConfig) -> dict[str, str]:
    """Fast-dLLM v2 tensor name -> our parameter name (Qwen2's names are ours), for every tensor it must hold."""
    return dream_tensor_names(config)
