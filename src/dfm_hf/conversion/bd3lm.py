"""BD3-LM (``model_type: "bd3lm"``) and MDLM (``model_type: "mdlm"``) checkpoints: the DiT body under
``backbone.*`` names (``DFMConfig.body = "dit"``), the mask token last, no logit shift, SUBS output.

BD3-LM's sampling forward is block-causal from position 0 with its config's ``block_size`` (``cross_attn: true``:
the training-time ``[x_t | x_0]`` mask, whose ``x_0`` half is exactly that pattern); MDLM attends over the whole
sequence. Both feed the adaLN the embedding of ``sigma``, which is 0 with ``time_conditioning: false`` (every
released checkpoint) and ``-log(max(t, 1e-3))`` of our time ``t`` otherwise (see ``DFMConfig.time_conditioning``).
"""

from __future__ import annotations

from typing import Any, Union

from ..models.configuration_dfm import DFMConfig
from .families import _check_values, _require

#: The width of the DiT's MLP, in hidden sizes (fixed in BD3-LM's and MDLM's code).
DIT_MLP_RATIO = 4
#: GPT-2's ``<|endoftext|>``, BOS and EOS of the released OpenWebText checkpoints (GPT-2 vocabulary + mask).
GPT2_EOS_TOKEN_ID = 50256
GPT2_VOCAB_WITH_MASK = 50258

# BD3-LM / MDLM block submodule -> ours (the fused ``attn_qkv`` holds the q, k and v rows stacked, in that order)
_BLOCK_NAMES: dict[str, Union[str, tuple[str, ...]]] = {
    "norm1.weight": "input_layernorm.weight",
    "attn_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn_out.weight": "self_attn.o_proj.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight",
    "mlp.2.bias": "mlp.fc2.bias",
    "adaLN_modulation.weight": "adaln_modulation.weight",
    "adaLN_modulation.bias": "adaln_modulation.bias",
}
_TOP_NAMES = {
    "backbone.vocab_embed.embedding": "model.embed_tokens.weight",
    "backbone.sigma_map.mlp.0.weight": "model.time_embedding.linear_1.weight",
    "backbone.sigma_map.mlp.0.bias": "model.time_embedding.linear_1.bias",
    "backbone.sigma_map.mlp.2.weight": "model.time_embedding.linear_2.weight",
    "backbone.sigma_map.mlp.2.bias": "model.time_embedding.linear_2.bias",
    "backbone.output_layer.norm_final.weight": "model.norm.weight",
    "backbone.output_layer.adaLN_modulation.weight": "model.final_modulation.weight",
    "backbone.output_layer.adaLN_modulation.bias": "model.final_modulation.bias",
    "backbone.output_layer.linear.weight": "lm_head.weight",
    "backbone.output_layer.linear.bias": "lm_head.bias",
}


def bd3lm_config_to_dfm(config: dict[str, Any]) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for a BD3-LM or MDLM ``config.json`` dict.

    The mask token is the last id (``vocab_size - 1``, GPT-2's 50257 in the released models); ``model_length`` is
    the longest sequence; ``dropout`` the residual dropout (training only). BOS / EOS are the config's ids, else
    GPT-2's 50256 for a vocabulary of 50258. ``attn_backend`` (flex or sdpa) and BD3-LM's ``var_min`` /
    ``sampling_eps_*`` (training-time noise clipping) do not change the network. Refused: ``adaln: false``,
    ``causal: true`` (BD3-LM's autoregressive baseline), ``hidden_dim`` not divisible by ``n_heads``. A BD3-LM
    config with ``cross_attn: false`` has no attention mask in its own forward: full attention, as MDLM.
    """
    model_type = config.get("model_type")
    family = "BD3-LM" if model_type == "bd3lm" else "MDLM"
    _check_values(config, family, {"adaln": (True,), "causal": (False,), "attn_backend": ("flex", "sdpa")})
    hidden = int(_require(config, "hidden_dim", family))
    heads = int(_require(config, "n_heads", family))
    if hidden % heads:
        raise ValueError(f"{family} config: `hidden_dim` ({hidden}) must be divisible by `n_heads` ({heads}).")
    vocab = int(_require(config, "vocab_size", family))
    length = int(_require(config, "model_length", family))
    block_size = None  # MDLM, and BD3-LM without `cross_attn` (its forward then has no mask): full attention
    if model_type == "bd3lm" and config.get("cross_attn", True):
        block_size = int(_require(config, "block_size", family))
    default_eos = GPT2_EOS_TOKEN_ID if vocab == GPT2_VOCAB_WITH_MASK else None
    eos = config.get("eos_token_id", default_eos)
    bos = config.get("bos_token_id", default_eos)
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=int(_require(config, "n_blocks", family)),
        num_attention_heads=heads,
        intermediate_size=DIT_MLP_RATIO * hidden,
        max_position_embeddings=length,
        body="dit",
        cond_dim=int(_require(config, "cond_dim", family)),
        time_conditioning=bool(config.get("time_conditioning", False)),
        tie_word_embeddings=False,
        hidden_dropout=float(config.get("dropout", 0.0) or 0.0),
        logits_shift=False,
        block_size=block_size,
        subs_parameterization=True,
        mask_token_id=vocab - 1,
        eos_token_id=eos,
        bos_token_id=bos,
        pad_token_id=config.get("pad_token_id"),
    )


def bd3lm_tensor_names(config: DFMConfig) -> dict[str, Union[str, tuple[str, ...]]]:
    """BD3-LM / MDLM tensor name -> our parameter name (the ``(q, k, v)`` names for a fused ``attn_qkv``), for every
    tensor such a checkpoint must hold (its ``rotary_emb.inv_freq`` and BD3-LM's ``sampling_eps_min`` /
    ``sampling_eps_max`` buffers carry no weights)."""
    names: dict[str, Union[str, tuple[str, ...]]] = dict(_TOP_NAMES)
    for i in range(config.num_hidden_layers):
        for theirs, ours in _BLOCK_NAMES.items():
            prefix = f"model.layers.{i}."
            names[f"backbone.blocks.{i}.{theirs}"] = (
                prefix + ours if isinstance(ours, str) else tuple(prefix + name for name in ours)
            )
    return names


__all__ = ["DIT_MLP_RATIO", "GPT2_EOS_TOKEN_ID", "bd3lm_config_to_dfm", "bd3lm_tensor_names"]
