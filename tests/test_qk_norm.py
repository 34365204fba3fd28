"""``DFMConfig(qk_norm=True)``: an RMS norm over ``head_dim`` on queries and keys before the rotary embedding.

Checked against transformers' Qwen3 (which has exactly that norm): the same weights under causal attention
(``block_size=1``) give the same logits; the default config builds no norm parameters and keeps its logits."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dfm_hf.models import DFMConfig, DFMForMaskedGeneration


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # norm scales away from 1, so a missing or misplaced norm shows
        for name, parameter in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.uniform_(0.5, 2.0)
    return model


def dfm_like(source: Qwen3ForCausalLM, **overrides) -> DFMForMaskedGeneration:
    c = source.config
    config = DFMConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        block_size=1,
        **overrides,
    )
    return DFMForMaskedGeneration(config).eval()


def test_qk_norm_matches_qwen3_under_causal_attention():
    source = tiny_qwen3()
    model = dfm_like(source, qk_norm=True)
    attention = model.model.layers[0].self_attn
    assert attention.q_norm.weight.shape == (16,) and attention.k_norm.weight.shape == (16,)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = source(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    with torch.no_grad():  # the norm acts: unit scales give other logits
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
        assert float((model(input_ids=ids).logits - theirs).abs().max()) > 1e-3


def test_default_config_has_no_qk_norm():
    source = tiny_qwen3()
    model = dfm_like(source)
    assert model.config.qk_norm is False
    assert not any("q_norm" in name or "k_norm" in name for name, _ in model.named_parameters())
    assert "qk_norm" in model.config.to_dict()
    reloaded = DFMConfig.from_dict(model.config.to_dict())
    assert reloaded.qk_norm is False


def test_qk_norm_roundtrips_and_is_validated(tmp_path):
    source = tiny_qwen3()
    model = dfm_like(source, qk_norm=True)
    model.load_state_dict(source.state_dict())
    model.save_pretrained(tmp_path)
    again = DFMForMaskedGeneration.from_pretrained(tmp_path).eval()
    assert again.config.qk_norm is True
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="qk_norm"):
        DFMConfig(qk_norm="yes")
