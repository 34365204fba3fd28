"""RoPE through ``DFMConfig.rope_parameters``: every rope type of transformers' ``ROPE_INIT_FUNCTIONS`` (default,
linear, dynamic, yarn, llama3, longrope) converts exactly from a causal LM (in causal attention mode our logits are
the source's next-token logits), survives a save/load round trip and a key/value cache; configs with ``rope_theta``
only keep plain RoPE; bad ``rope_parameters`` raise ``ValueError`` naming the key."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dfm_hf.conversion import causal_lm_config_to_dfm, dream_config_to_dfm, llada_config_to_dfm
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

ATOL = 1e-5
HEAD_DIM = ch.HIDDEN // ch.HEADS
BUNDLED = os.path.join(os.path.dirname(__file__), os.pardir, "src", "dfm_hf", "bundled")

LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.1, 1.3, 1.6],
    "long_factor": [1.0, 2.0, 4.0, 9.0],
    "original_max_position_embeddings": 8,
}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

# (source family, rope_parameters without rope_theta, source max_position_embeddings, sequence length)
CASES = {
    "llama-default": ("llama", {"rope_type": "default"}, ch.MAX_POS, 12),
    "llama-linear": ("llama", {"rope_type": "linear", "factor": 2.0}, ch.MAX_POS, 12),
    "llama-dynamic-short": ("llama", {"rope_type": "dynamic", "factor": 2.0}, 16, 12),
    "llama-dynamic-long": ("llama", {"rope_type": "dynamic", "factor": 2.0}, 8, 12),  # rescaled: 12 > 8
    "llama-yarn": ("llama", YARN, ch.MAX_POS, 12),
    "llama-llama3": ("llama", LLAMA3, ch.MAX_POS, 12),
    "llama-longrope-short": ("llama", LONGROPE, ch.MAX_POS, 6),
    "llama-longrope-long": ("llama", LONGROPE, ch.MAX_POS, 12),  # long factors: 12 > 8
    "qwen2-linear": ("qwen2", {"rope_type": "linear", "factor": 3.0}, ch.MAX_POS, 12),
    "qwen2-yarn": ("qwen2", {**YARN, "beta_fast": 16.0, "beta_slow": 2.0}, ch.MAX_POS, 12),
}


def source_lm(family: str, rope_parameters: dict, max_positions: int):
    make = ch.llama_source if family == "llama" else ch.qwen2_source
    return make(rope_parameters=dict(rope_parameters), max_position_embeddings=max_positions)


def causal_logits(model: DFMForMaskedGeneration, source, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ours, theirs)``: ours under a causal 4-D mask, realigned so that ours[i] is the source's logits at i - 1
    (the shifted head; position 0 reads its own state and is compared with the source's position 0)."""
    ids, _ = ch.padded_batch(vocab=300, lengths=(length, length))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=ch.causal_mask(*ids.shape)).logits[..., : ch.ROWS]
        theirs = source(input_ids=ids).logits
    return torch.cat([ours[:, :1], ours[:, 1:]], 1), torch.cat([theirs[:, :1], theirs[:, :-1]], 1)


def with_rope(model: DFMForMaskedGeneration, rope_parameters: dict) -> DFMForMaskedGeneration:
    """The same weights under other ``rope_parameters``."""
    other = DFMForMaskedGeneration(DFMConfig(**{**model.config.to_dict(), "rope_parameters": rope_parameters}))
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_scaled_rope_converts_exactly(case):
    family, rope_parameters, max_positions, length = CASES[case]
    source = source_lm(family, rope_parameters, max_positions)
    model = DFMForMaskedGeneration.from_causal_lm(source)
    config = model.config
    assert config.rope_parameters["rope_type"] == rope_parameters["rope_type"]
    assert config.rope_theta == source.config.rope_parameters["rope_theta"]
    ours, theirs = causal_logits(model, source, length)
    assert (ours - theirs).abs().max() < ATOL
    # the scaling is not a no-op here (the short dynamic / longrope cases excepted: they are plain / short-factor RoPE)
    plain = with_rope(model, {"rope_type": "default", "rope_theta": config.rope_theta})
    unscaled, _ = causal_logits(plain, source, length)
    changed = float((unscaled - theirs).abs().max())
    if case in ("llama-default", "llama-dynamic-short"):
        assert changed < ATOL
    else:
        assert changed > 1e-3


def test_dynamic_rescales_beyond_the_source_length_only():
    """transformers' dynamic NTK rescales beyond ``max_position_embeddings``; the converted model accepts ``factor``
    times that and rescales from the same length on."""
    source = source_lm("llama", {"rope_type": "dynamic", "factor": 2.0}, 8)
    config = DFMForMaskedGeneration.from_causal_lm(source).config
    assert config.max_position_embeddings == 16
    assert config.rope_parameters == {
        "rope_type": "dynamic",
        "factor": 2.0,
        "rope_theta": 500000.0,
        "original_max_position_embeddings": 8,
    }
    rotary = DFMForMaskedGeneration(config).model.rotary_emb
    cpu = torch.device("cpu")
    short, _ = rotary.frequencies(8, cpu)
    long, _ = rotary.frequencies(12, cpu)
    default = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))
    torch.testing.assert_close(short.double(), default, rtol=1e-6, atol=0)
    # NTK-aware base: theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))
    base = 500000.0 * (2.0 * 12 / 8 - 1.0) ** (HEAD_DIM / (HEAD_DIM - 2))
    expected = 1.0 / (base ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))
    torch.testing.assert_close(long.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rope_parameters", [LLAMA3, YARN, LONGROPE], ids=["llama3", "yarn", "longrope"])
def test_config_conversion_copies_rope_parameters(rope_parameters):
    from transformers import LlamaConfig, Qwen2Config

    for config_class in (LlamaConfig, Qwen2Config):
        source = config_class(
            hidden_size=ch.HIDDEN,
            num_attention_heads=ch.HEADS,
            num_key_value_heads=ch.KV_HEADS,
            max_position_embeddings=ch.MAX_POS,
            rope_parameters={**rope_parameters, "rope_theta": 1000.0},
        )
        kwargs = causal_lm_config_to_dfm(source, ch.ROWS + 1, ch.ROWS)
        assert kwargs["rope_parameters"] == {**rope_parameters, "rope_theta": 1000.0}
        assert kwargs["max_position_embeddings"] == ch.MAX_POS
        assert DFMConfig(**kwargs).rope_parameters == kwargs["rope_parameters"]


def test_legacy_rope_scaling_of_a_source_converts():
    """A legacy ``rope_scaling`` dict with ``type`` (as older Qwen2 configs ship it) reads as rope_parameters."""
    from transformers import Qwen2Config

    source = Qwen2Config(
        hidden_size=ch.HIDDEN,
        num_attention_heads=ch.HEADS,
        max_position_embeddings=ch.MAX_POS,
        rope_theta=1000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    )
    kwargs = causal_lm_config_to_dfm(source, ch.ROWS + 1, ch.ROWS)
    assert kwargs["rope_parameters"] == {**YARN, "rope_theta": 1000.0}


def test_partial_rotary_source_is_refused():
    from transformers import LlamaConfig

    source = LlamaConfig(
        hidden_size=ch.HIDDEN,
        num_attention_heads=ch.HEADS,
        max_position_embeddings=ch.MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
    )
    with pytest.raises(ValueError, match=r"partial_rotary_factor.*accepted: 1\.0"):
        causal_lm_config_to_dfm(source, ch.ROWS + 1, ch.ROWS)


def test_dream_rope_scaling_converts_exactly(tmp_path):
    """A Dream checkpoint whose config carries a (legacy, transformers 4.x) ``rope_scaling`` converts to the same
    ``rope_parameters``; the logits are those of the Qwen2 model with that RoPE, run bidirectionally and shifted."""
    source = source_lm("qwen2", YARN, ch.MAX_POS)
    legacy = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    folder = ch.write_checkpoint(str(tmp_path), ch.dream_tensors(source), ch.dream_config(rope_scaling=legacy))
    model = DFMForMaskedGeneration.from_pretrained(folder)
    assert model.config.rope_parameters == {**YARN, "rope_theta": 1000000.0}
    ids, attention = ch.padded_batch(vocab=300)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=attention).logits
        theirs = source(input_ids=ids, attention_mask=ch.bidirectional_mask(attention)).logits
    real = attention.bool()
    real[:, 0] = False  # position 0 reads its own state; the others read i - 1
    assert (ours[real] - theirs[:, :-1][real[:, 1:]]).abs().max() < ATOL
    dynamic = dream_config_to_dfm(ch.dream_config(rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
    assert dynamic["max_position_embeddings"] == 4 * ch.MAX_POS
    assert dynamic["rope_parameters"]["original_max_position_embeddings"] == ch.MAX_POS


def test_llada_rope_is_plain_and_scaling_is_refused():
    assert llada_config_to_dfm(ch.llada_config())["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    with pytest.raises(ValueError, match=r"LLaDA config: `rope_scaling.rope_type` = 'linear'.*accepted: \['default'\]"):
        llada_config_to_dfm(ch.llada_config(rope_scaling={"rope_type": "linear", "factor": 2.0}))


@pytest.mark.parametrize("rope_parameters", [YARN, LONGROPE, {"rope_type": "dynamic", "factor": 2.0}])
def test_save_load_round_trip_keeps_rope_parameters(tmp_path, rope_parameters):
    source = source_lm("llama", rope_parameters, 8 if rope_parameters["rope_type"] == "dynamic" else ch.MAX_POS)
    model = DFMForMaskedGeneration.from_causal_lm(source)
    ids, _ = ch.padded_batch(vocab=300, lengths=(12, 12))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    assert "rotary.py" in os.listdir(tmp_path)  # remote code: the rotary module travels with the modeling file
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"] == model.config.rope_parameters and "rope_theta" not in saved
    loaded = DFMForMaskedGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == model.config.rope_parameters
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def hand_rope_tables(theta: float, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain RoPE in float64: row p is cos / sin of p * theta^(-2j / head_dim), j = 0..head_dim/2 - 1, twice."""
    angles = torch.arange(length).double()[:, None] * theta ** (-torch.arange(0, head_dim, 2).double() / head_dim)
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def test_rope_theta_only_config_keeps_plain_rope(tmp_path):
    """A config.json with ``rope_theta`` and no ``rope_parameters`` (every checkpoint saved before them) loads as
    plain RoPE with that base: the tables are the hand-computed ones and the logits those of transformers' Llama with
    the same weights and a bidirectional mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = DFMForMaskedGeneration(
        DFMConfig(
            vocab_size=ch.ROWS,
            hidden_size=ch.HIDDEN,
            num_hidden_layers=ch.LAYERS,
            num_attention_heads=ch.HEADS,
            num_key_value_heads=ch.KV_HEADS,
            intermediate_size=ch.FFN,
            max_position_embeddings=ch.MAX_POS,
            rope_theta=500.0,
        )
    )
    ch.randomize(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("rope_parameters", None)
    saved["rope_theta"] = 500.0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = DFMForMaskedGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    assert loaded.config.rope_theta == 500.0
    cos, sin = loaded.model.rotary_emb(None, 20, torch.device("cpu"), torch.float32)
    hand_cos, hand_sin = hand_rope_tables(500.0, HEAD_DIM, 20)
    torch.testing.assert_close(cos.double(), hand_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), hand_sin, atol=1e-6, rtol=0)

    llama_config = LlamaConfig(
        vocab_size=ch.ROWS,
        hidden_size=ch.HIDDEN,
        num_hidden_layers=ch.LAYERS,
        num_attention_heads=ch.HEADS,
        num_key_value_heads=ch.KV_HEADS,
        intermediate_size=ch.FFN,
        max_position_embeddings=ch.MAX_POS,
        rms_norm_eps=model.config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=True,
    )
    llama_config._attn_implementation = "eager"
    reference = LlamaForCausalLM(llama_config).eval()
    reference.load_state_dict(loaded.state_dict(), strict=True)
    ids, _ = ch.padded_batch(vocab=300, lengths=(12, 12))
    with torch.no_grad():
        ours = loaded(ids).logits
        theirs = reference(ids, attention_mask=torch.zeros(2, 1, 12, 12)).logits
    assert (ours - theirs).abs().max() < ATOL


@pytest.mark.parametrize("name, theta", [("dfm-code-stdlib", 10000.0), ("dfm-code-smollm2", 100000.0)])
def test_shipped_configs_with_rope_theta_load_as_plain_rope(name, theta):
    config = DFMConfig.from_pretrained(os.path.join(BUNDLED, name, "model"))
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": theta}


@pytest.mark.parametrize("rope_parameters", [LONGROPE, {"rope_type": "dynamic", "factor": 2.0}])
def test_length_dependent_rope_with_a_cache_uses_the_whole_sequence(rope_parameters):
    """A partial forward against a current cache equals the full forward: the rows of a slice are those of the whole
    cached sequence (20 positions, beyond the original 8 or 10), not those of a sequence ending at the slice (7
    positions, within it); explicit positions without a cache read their largest one."""
    source = source_lm("llama", rope_parameters, 10 if rope_parameters["rope_type"] == "dynamic" else ch.MAX_POS)
    model = DFMForMaskedGeneration.from_causal_lm(source)
    assert model.config.max_position_embeddings >= 20
    ids, _ = ch.padded_batch(vocab=300, lengths=(20, 20))
    positions = torch.arange(2, 7)[None].expand(2, 5)
    with torch.no_grad():
        full = model(ids, use_cache=True)
        partial = model(ids[:, 2:7], position_ids=positions, past_key_values=full.past_key_values).logits
        explicit = model(ids, position_ids=torch.arange(20)[None].expand(2, 20)).logits
    # (shifted head: the logits at p read the state at p - 1, so the slice's first position has no source in it)
    torch.testing.assert_close(partial[:, 1:], full.logits[:, 3:7], atol=ATOL, rtol=0)
    torch.testing.assert_close(explicit, full.logits, atol=ATOL, rtol=0)
    rotary = model.model.rotary_emb
    assert not torch.equal(rotary.frequencies(7, ids.device)[0], rotary.frequencies(20, ids.device)[0])


@pytest.mark.parametrize(
    "rope_parameters, match",
    [
        ({"rope_type": "ntk"}, r"rope_type.*must be one of \['default', 'linear', 'dynamic', 'yarn'"),
        ({"rope_type": "linear"}, r"rope_type 'linear' needs \['factor'\]"),
        ({"rope_type": "linear", "factor": 0.5}, r"`rope_parameters\['factor'\]` must be a finite number >= 1"),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, r"keys \['beta_fast'\] are not used by rope_type"),
        ({"rope_type": "yarn", "factor": 2.0, "truncate": "yes"}, r"`rope_parameters\['truncate'\]`"),
        ({"rope_type": "default", "rope_theta": -1.0}, r"`rope_parameters\['rope_theta'\]` must be a finite number"),
        ({"rope_type": "default", "partial_rotary_factor": 1.5}, r"partial_rotary_factor.*a number in \(0, 1\]"),
        ({"rope_type": "default", "partial_rotary_factor": 0.1}, r"partial_rotary_factor.*positive even number"),
        ({**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, r"high_freq_factor.*must be greater"),
        ({**LONGROPE, "short_factor": [1.0, 1.0]}, r"short_factor.*rotary_dim / 2 = 4"),
        ({**LONGROPE, "original_max_position_embeddings": 0}, r"original_max_position_embeddings.*positive integer"),
        ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, r"`rope_type` 'yarn' and `type` 'linear'"),
        ("linear", r"`rope_parameters` must be None or a dict"),
    ],
)
def test_bad_rope_parameters_are_refused(rope_parameters, match):
    with pytest.raises(ValueError, match=match):
        DFMConfig(hidden_size=ch.HIDDEN, num_attention_heads=ch.HEADS, rope_parameters=rope_parameters)


def test_rope_theta_and_rope_parameters_must_agree():
    config = DFMConfig(rope_theta=500.0, rope_parameters={"rope_type": "linear", "factor": 2.0})
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    with pytest.raises(ValueError, match=r"`rope_theta` \(500.0\) differs from `rope_parameters\['rope_theta'\]`"):
        DFMConfig(rope_theta=500.0, rope_parameters={"rope_type": "default", "rope_theta": 10.0})
    config.rope_theta = 20.0  # the name reads and writes rope_parameters["rope_theta"]
    assert config.rope_parameters["rope_theta"] == 20.0
    with pytest.raises(ValueError, match="rope_theta"):
        config.rope_theta = math.inf
