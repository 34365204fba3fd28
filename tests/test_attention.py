"""The attention interface of the DFM model: eager / SDPA / flex attention give the same logits, the implementation
switches, and the one mask builder writes each pattern in the form each attention function reads (tiny CPU models)."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dfm_hf.models import DFMBlockCache, DFMConfig, DFMForMaskedGeneration
from dfm_hf.models.masking import block_causal_pattern, create_attention_mask

VOCAB = 64
MASK = 63
LENGTH = 16


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(seed: int = 0, **overrides) -> DFMForMaskedGeneration:
    """GQA, q/k/v biases, an explicit head_dim, shifted logits, time conditioning; random weights everywhere."""
    kwargs = dict(
        vocab_size=VOCAB,
        mask_token_id=MASK,
        pad_token_id=0,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=96,
        max_position_embeddings=64,
        attention_bias=True,
        logits_shift=True,
        tie_word_embeddings=False,
        time_conditioning=True,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = DFMForMaskedGeneration(DFMConfig(**kwargs)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g) * 0.15
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows, right padding in rows 1 and 2, and one time per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, MASK, (3, LENGTH), generator=g)
    mask = (torch.arange(LENGTH)[None] < torch.tensor([LENGTH, 11, 6])[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask, torch.tensor([0.2, 0.5, 0.9])


def block_causal_bool(length: int, block: int) -> torch.Tensor:
    """``(1, 1, L, L)``: query ``i`` attends to key ``j`` iff ``j // block <= i // block``, written as a loop."""
    allowed = torch.zeros(1, 1, length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            allowed[0, 0, i, j] = j // block <= i // block
    return allowed


def additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def run_all(model: DFMForMaskedGeneration) -> dict[str, torch.Tensor]:
    """Logits of the same inputs: no mask, padding mask, bool and float 4-D masks, and a cached partial forward
    (flex attention reads masks as BlockMasks: it refuses the additive float one by name)."""
    ids, mask, t = inputs()
    causal = block_causal_bool(LENGTH, 4) & mask.bool()[:, None, None, :]
    pos = torch.tensor([[3, 4, 5, 6, 7]] * 3)
    with torch.no_grad():
        out = {
            "none": model(input_ids=ids, timesteps=t).logits,
            "padding": model(input_ids=ids, attention_mask=mask, timesteps=t).logits,
            "bool": model(input_ids=ids, attention_mask=causal, timesteps=t).logits,
        }
        if model.config._attn_implementation == "flex_attention":
            with pytest.raises(ValueError, match="attention_mask"):
                model(input_ids=ids, attention_mask=additive(causal), timesteps=t)
        else:
            out["float"] = model(input_ids=ids, attention_mask=additive(causal), timesteps=t).logits
        cache = DFMBlockCache()
        model(input_ids=ids, attention_mask=mask, timesteps=t, past_key_values=cache, use_cache=True)
        out["cached"] = model(
            input_ids=ids.gather(1, pos), attention_mask=mask, timesteps=t, position_ids=pos, past_key_values=cache
        ).logits
    return out


def test_sdpa_and_eager_give_the_same_logits():
    model = make_model()
    assert model.config._attn_implementation == "sdpa"
    sdpa = run_all(model)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    eager = run_all(model)
    for key in sdpa:
        assert (sdpa[key] - eager[key]).abs().max() < 1e-5, key
    real = inputs()[1].bool()
    assert (sdpa["bool"][real] - sdpa["padding"][real]).abs().max() > 1e-3  # the 4-D mask is not the padding mask
    torch.testing.assert_close(sdpa["float"], sdpa["bool"], atol=1e-6, rtol=1e-6)


def test_flex_attention_gives_the_same_logits():
    model = make_model()
    reference = run_all(model)
    model.set_attn_implementation("flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    try:
        flex = run_all(model)
    except Exception as err:  # noqa: BLE001 - only torch's own refusal of CPU flex attention skips
        if "cpu" in str(err).lower() and "support" in str(err).lower():
            pytest.skip(f"torch does not run flex attention on this CPU: {err}")
        raise
    assert set(flex) == set(reference) - {"float"}
    for key in flex:
        assert (flex[key] - reference[key]).abs().max() < 1e-5, key


def test_attn_implementation_switches_the_function_called(tmp_path):
    """``set_attn_implementation`` and ``from_pretrained(attn_implementation=...)`` select the function of
    transformers' attention interface that every layer calls (a registered custom function included)."""
    calls: list[int] = []

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("dfm_counting_test", counting)
    model = make_model()
    ids, mask, t = inputs()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, timesteps=t).logits
        model.set_attn_implementation("dfm_counting_test")
        counted = model(input_ids=ids, attention_mask=mask, timesteps=t).logits
    assert calls == [0, 1]
    torch.testing.assert_close(counted, expected, atol=0.0, rtol=0.0)
    model.set_attn_implementation("sdpa")
    model.save_pretrained(tmp_path)
    for implementation in ("eager", "dfm_counting_test"):
        loaded = DFMForMaskedGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.config._attn_implementation == implementation
        assert all(layer.self_attn.config._attn_implementation == implementation for layer in loaded.model.layers)
        with torch.no_grad():
            logits = loaded(input_ids=ids, attention_mask=mask, timesteps=t).logits
        assert (logits - expected).abs().max() < 1e-5
    assert calls == [0, 1, 0, 1]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_output_attentions(attn_implementation):
    """The attention probabilities ``(batch, heads, len, key_len)``: rows sum to 1, padded keys get 0 (an SDPA model
    runs the eager function when they are asked for)."""
    model = make_model()
    model.set_attn_implementation(attn_implementation)
    ids, mask, t = inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, timesteps=t, output_attentions=True)
        plain = model(input_ids=ids, attention_mask=mask, timesteps=t).logits
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, LENGTH, LENGTH)
    for weights in out.attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, LENGTH))
        assert weights[1, :, :, 11:].abs().max() == 0 and weights[2, :, :, 6:].abs().max() == 0
    assert (out.logits - plain).abs().max() < 1e-5


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_block_causal_pattern_is_a_mask(implementation):
    """A pattern is one more rule of the mask builder: block-causal over absolute positions (``j // K <= i // K``),
    the same rule in the additive form and in flex attention's BlockMask, and read at the query positions of a
    cached partial forward."""
    dense = block_causal_bool(LENGTH, 4)
    args = dict(batch=1, num_heads=4, dtype=torch.float32, device=torch.device("cpu"), block_size=4)
    built = create_attention_mask(
        None, attn_implementation=implementation, query_length=LENGTH, key_length=LENGTH, **args
    )
    if implementation == "flex_attention":
        zero = torch.tensor(0)
        grid = [
            [bool(built.mask_mod(zero, zero, torch.tensor(i), torch.tensor(j))) for j in range(LENGTH)]
            for i in range(LENGTH)
        ]
        assert torch.equal(torch.tensor(grid), dense[0, 0])
        assert (built.seq_lengths, built.shape[0]) == ((LENGTH, LENGTH), 1)
    else:
        torch.testing.assert_close(built, additive(dense), atol=0.0, rtol=0.0)
    # a cached partial forward: queries at positions 5..9, keys at every position of the cache
    query = torch.arange(5, 10)[None]
    rows = block_causal_pattern(query, torch.arange(LENGTH)[None], 4)
    assert torch.equal(rows[0, 0], dense[0, 0, 5:10])
    with pytest.raises(ValueError, match="block_size"):
        block_causal_pattern(query, torch.arange(LENGTH)[None], 0)


def test_flash_attention_reads_only_padding_masks():
    args = dict(
        attn_implementation="flash_attention_2",
        batch=3,
        num_heads=4,
        dtype=torch.float16,
        device=torch.device("cpu"),
    )
    _, mask, _ = inputs()
    assert create_attention_mask(None, query_length=LENGTH, key_length=LENGTH, **args) is None
    assert create_attention_mask(mask, query_length=LENGTH, key_length=LENGTH, **args) is mask
    four_d = torch.ones(3, 1, LENGTH, LENGTH, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_mask"):
        create_attention_mask(four_d, query_length=LENGTH, key_length=LENGTH, **args)
    with pytest.raises(ValueError, match="attention_mask"):
        create_attention_mask(mask, query_length=4, key_length=LENGTH, **args)
