"""Tiny checkpoints in the exact formats of released diffusion LMs, built from random transformers weights.

- LLaDA (``model_type: "llada"``): the config keys of GSAI-ML/LLaDA-8B-* ``config.json`` and OLMo-style tensor names
  (``model.transformer.wte``, ``.blocks.{i}.attn_norm`` ...), written from a random ``LlamaForCausalLM`` (LLaDA's
  blocks compute what Llama's do; run bidirectionally, no logit shift).
- Dream / DiffuCoder (``model_type: "Dream"``): Qwen2 config keys and tensor names, written from a random
  ``Qwen2ForCausalLM`` (q/k/v biases, untied head; run bidirectionally with shifted logits).

Every weight is randomised (norm scales and biases included) so that a wrong mapping cannot go unnoticed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from safetensors.torch import save_file

try:
    from .helpers import tiny_tokenizer
except ImportError:
    from helpers import tiny_tokenizer

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, MAX_POS = 32, 2, 4, 2, 48, 64
ROWS = 392  # embedding rows: more than the 385 tokens of the test tokenizer, like LLaDA's and Qwen2's padded tables
LLADA_MASK = 384  # "<|mdm_mask|>", added to the 384-token test tokenizer
DREAM_MASK = 2  # the test tokenizer's "<|mask|>"

_LLADA_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "post_attention_layernorm": "ff_norm",
    "mlp.gate_proj": "ff_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
}
_LLADA_TOP = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random: matrices ~ N(0, 0.2), vectors (norm scales, biases) ~ 1 + N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + (1.0 if p.dim() == 1 and p.shape[0] == HIDDEN else 0.0))
    return model.eval()


def llama_source(tied: bool = False, seed: int = 0, vocab: int = ROWS, **overrides: Any) -> Any:
    """A random ``LlamaForCausalLM`` (GQA 4 query / 2 key-value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        vocab_size=vocab,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return randomize(LlamaForCausalLM(LlamaConfig(**kwargs)), seed)


def qwen2_source(tied: bool = False, seed: int = 1, vocab: int = ROWS, **overrides: Any) -> Any:
    """A random ``Qwen2ForCausalLM`` (GQA, q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        vocab_size=vocab,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return randomize(Qwen2ForCausalLM(Qwen2Config(**kwargs)), seed)


def mistral_source(seed: int = 2, sliding_window: Optional[int] = None, **overrides: Any) -> Any:
    """A random ``MistralForCausalLM`` (GQA, no biases, optional sliding window)."""
    from transformers import MistralConfig, MistralForCausalLM

    kwargs = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        intermediate_size=FFN,
        vocab_size=ROWS,
        max_position_embeddings=MAX_POS,
        sliding_window=sliding_window,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return randomize(MistralForCausalLM(MistralConfig(**kwargs)), seed)


def llada_config(**overrides: Any) -> dict[str, Any]:
    """A LLaDA ``config.json`` with the keys of the released 8B one, at the tiny sizes."""
    config = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": HIDDEN,
        "embedding_dropout": 0.0,
        "embedding_size": ROWS,
        "eos_token_id": 1,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": LLADA_MASK,
        "max_sequence_length": MAX_POS,
        "mlp_hidden_size": FFN,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": HEADS,
        "n_kv_heads": KV_HEADS,
        "n_layers": LAYERS,
        "pad_token_id": 1,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": LLADA_MASK + 1,
        "weight_tying": False,
    }
    config.update(overrides)
    return config


def dream_config(**overrides: Any) -> dict[str, Any]:
    """A Dream ``config.json`` (Qwen2 keys, as Dream-org/Dream-v0-*-7B ship them), at the tiny sizes."""
    config = {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": 1,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "mask_token_id": DREAM_MASK,
        "max_position_embeddings": MAX_POS,
        "max_window_layers": LAYERS,
        "model_type": "Dream",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.46.2",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": ROWS,
    }
    config.update(overrides)
    return config


def llada_tensors(source: Any) -> dict[str, torch.Tensor]:
    """The state dict of a Llama source under LLaDA's tensor names."""
    out = {}
    for name, tensor in source.state_dict().items():
        if name in _LLADA_TOP:
            if name == "lm_head.weight" and source.config.tie_word_embeddings:
                continue
            out[_LLADA_TOP[name]] = tensor
            continue
        _, _, index, *rest = name.split(".")
        sub = ".".join(rest[:-1])
        out[f"model.transformer.blocks.{index}.{_LLADA_BLOCK[sub]}.{rest[-1]}"] = tensor
    return out


def dream_tensors(source: Any) -> dict[str, torch.Tensor]:
    """The state dict of a Qwen2 source (Dream's names are Qwen2's)."""
    tensors = dict(source.state_dict())
    if source.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def write_checkpoint(folder: str, tensors: dict[str, torch.Tensor], config: dict[str, Any], shards: int = 1) -> str:
    """Write ``config.json`` and the tensors as ``model.safetensors`` (``shards=1``) or as ``shards`` files with a
    ``model.safetensors.index.json``."""
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return folder


def llada_tokenizer() -> Any:
    """The test tokenizer with LLaDA's ``<|mdm_mask|>`` added (id 384) and no declared mask token, as LLaDA's."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<|mdm_mask|>"], special_tokens=True)
    return tok


def save_tokenizer(tok: Any, folder: str, drop_mask: bool = False, custom_class: Optional[str] = None) -> None:
    """Save ``tok``; ``drop_mask`` removes the declared mask token, ``custom_class`` names a remote-code class (like
    Dream's ``DreamTokenizer``) in ``tokenizer_config.json``."""
    tok.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if drop_mask:
        config.pop("mask_token", None)
    if custom_class:
        config["tokenizer_class"] = custom_class
        config["auto_map"] = {"AutoTokenizer": [f"tokenization_dream.{custom_class}", None]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive 4-D mask (batch, 1, len, len) letting every query see every real key (0) and no padded key."""
    keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def causal_mask(batch: int, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive 4-D causal mask (batch, 1, len, len): query ``i`` sees keys ``0..i``."""
    blocked = torch.ones(length, length, dtype=torch.bool).triu(1)
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)
    return mask[None, None].expand(batch, 1, length, length).clone()


def padded_batch(seed: int = 0, vocab: int = LLADA_MASK, lengths: tuple[int, ...] = (12, 9, 5)) -> tuple:
    """``(input_ids, attention_mask)``: random ids below ``vocab``, right-padded (pad id 0) to the longest row."""
    gen = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), length), generator=gen)
    attention = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, n in enumerate(lengths):
        attention[row, :n] = 1
        ids[row, n:] = 0
    return ids, attention


def block_causal_mask(
    attention_mask: torch.Tensor, block_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The additive 4-D block-causal mask (batch, 1, len, len): query ``i`` sees real key ``j`` when
    ``pos_j // block_size <= pos_i // block_size``, positions counted over each row's real tokens (blocks from 0)."""
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    blocks = positions.div(block_size, rounding_mode="floor")
    keep = (blocks[:, None, :] <= blocks[:, :, None]) & attention_mask.bool()[:, None, :]
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[:, None]
