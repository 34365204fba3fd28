"""Block-diffusion models (``DFMConfig(block_size=K)``): the training mask of the ``[x_t | x_0]`` layout, the
block-causal pattern in every attention implementation, the exact append-style key/value cache, and the conversion of
causal LMs (``block_size=1`` reproduces their next-token logits). Tiny CPU models."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dfm_hf.models import DFMBlockCache, DFMConfig, DFMForMaskedGeneration
from dfm_hf.models.cache import crop_cache
from dfm_hf.models.masking import block_diffusion_training_mask

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

VOCAB = 64
MASK = 63
BLOCK = 4


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def training_mask_loop(positions: torch.Tensor, block: int, padding: torch.Tensor) -> torch.Tensor:
    """The ``[x_t | x_0]`` rule written pair by pair over (query, key)."""
    batch, length = positions.shape
    allowed = torch.zeros(batch, 1, 2 * length, 2 * length, dtype=torch.bool)
    for b in range(batch):
        for q in range(2 * length):
            for k in range(2 * length):
                qb, kb = int(positions[b, q % length]) // block, int(positions[b, k % length]) // block
                if q < length:  # a noisy query: its own noisy block, earlier clean blocks
                    rule = kb == qb if k < length else kb < qb
                else:  # a clean query: clean blocks up to its own
                    rule = k >= length and kb <= qb
                allowed[b, 0, q, k] = q == k or (rule and bool(padding[b, k % length]))
    return allowed


@pytest.mark.parametrize("block", [1, 3, 4])
def test_block_diffusion_training_mask_matches_the_pairwise_rule(block):
    length = 10
    padding = torch.ones(3, length, dtype=torch.long)
    padding[1, :3] = 0  # left padding
    padding[2, 7:] = 0  # right padding
    positions = (padding.cumsum(1) - 1).clamp_min(0)
    positions[0] = torch.arange(length) + 5  # blocks need not start at the row's first token
    mask = block_diffusion_training_mask(positions, block, padding)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 2 * length, 2 * length)
    assert torch.equal(mask, training_mask_loop(positions, block, padding))
    assert mask.any(dim=-1).all()  # no empty row
    # without padding, and with 1-D positions broadcast over the batch
    plain = block_diffusion_training_mask(torch.arange(length), block)
    assert plain.shape == (1, 1, 2 * length, 2 * length)
    assert torch.equal(plain, training_mask_loop(torch.arange(length)[None], block, torch.ones(1, length)))


def test_block_diffusion_training_mask_refuses_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        block_diffusion_training_mask(torch.arange(4), 0)
    with pytest.raises(ValueError, match="position_ids"):
        block_diffusion_training_mask(torch.rand(4), 2)
    with pytest.raises(ValueError, match="padding_mask"):
        block_diffusion_training_mask(torch.arange(4)[None], 2, torch.ones(1, 5))


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------


def make_model(block_size=BLOCK, seed: int = 0, **overrides) -> DFMForMaskedGeneration:
    """GQA, q/k/v biases, an explicit head_dim, untied head; random weights everywhere."""
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
        block_size=block_size,
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


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, MASK + 1, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``r`` loses its last ``pads[r]`` tokens and gets ``pads[r]`` pad tokens (id 0) on the left instead."""
    rows, masks = [], []
    for row, pad in zip(ids, pads):
        rows.append(torch.cat([torch.zeros(pad, dtype=ids.dtype), row[: ids.shape[1] - pad]]))
        masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(ids.shape[1] - pad, dtype=torch.long)]))
    return torch.stack(rows), torch.stack(masks)


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_from_causal_lm_passes_block_size(tmp_path):
    """``from_causal_lm(..., block_size=K)`` on the model and the pipeline, from a folder and from a loaded model; a
    bad value is refused before any weight is read."""
    from dfm_hf.pipelines import DFMPipeline

    source = ch.llama_source(seed=3)
    folder = tmp_path / "llama"
    source.save_pretrained(folder)
    ch.tiny_tokenizer().save_pretrained(folder)
    model = DFMForMaskedGeneration.from_causal_lm(str(folder), mask_token="<|dfm_mask|>", block_size=BLOCK)
    assert (model.config.block_size, model.config.logits_shift) == (BLOCK, True)
    pipe = DFMPipeline.from_causal_lm(str(folder), mask_token="<|dfm_mask|>", block_size=BLOCK)
    assert pipe.model.config.block_size == BLOCK
    pipe = DFMPipeline.from_causal_lm(source, tokenizer=ch.tiny_tokenizer(), mask_token="<|dfm_mask|>", block_size=2)
    assert pipe.model.config.block_size == 2
    assert (
        DFMPipeline.from_causal_lm(source, tokenizer=ch.tiny_tokenizer(), mask_token_id=2).model.config.block_size
        is None
    )
    for convert in (DFMForMaskedGeneration.from_causal_lm, DFMPipeline.from_causal_lm):
        with pytest.raises(ValueError, match="block_size"):
            convert(str(tmp_path / "missing"), block_size=0)


def test_config_block_size_is_validated_saved_and_loaded(tmp_path):
    assert DFMConfig().block_size is None
    for bad in (0, -2, 2.0, True, "4"):
        with pytest.raises(ValueError, match="block_size"):
            DFMConfig(block_size=bad)
    model = make_model()
    model.save_pretrained(tmp_path)
    assert '"block_size": 4' in (tmp_path / "config.json").read_text()
    loaded = DFMForMaskedGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.block_size == BLOCK
    ids = random_ids(2, 12)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("make", [ch.llama_source, ch.qwen2_source], ids=["llama", "qwen2"])
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_block_size_1_reproduces_the_causal_lm(make, padded):
    """``block_size=1`` is the causal LM: our logits at ``i`` are its next-token logits at ``i - 1`` (position 0 reads
    its own hidden state), with left padding too (the causal LM given the row positions, as ``generate`` does)."""
    source = make()
    model = DFMForMaskedGeneration.from_causal_lm(source, block_size=1)
    assert (model.config.block_size, model.config.logits_shift) == (1, True)
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    pads = [0, 3, 7] if padded else [0, 0, 0]
    ids, mask = left_padded(ids, pads)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits[..., : ch.ROWS]
        theirs = source(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for row, pad in enumerate(pads):
        assert (ours[row, pad] - theirs[row, pad]).abs().max() < 1e-5
        assert (ours[row, pad + 1 :] - theirs[row, pad:-1]).abs().max() < 1e-5
    if not padded:  # the block pattern is the causal model's attention, not the bidirectional one
        bidirectional = DFMForMaskedGeneration.from_causal_lm(source)
        assert (logits(bidirectional, ids)[..., : ch.ROWS] - ours).abs().max() > 1e-2


@pytest.mark.parametrize("logits_shift", [False, True])
def test_later_blocks_never_change_earlier_logits(logits_shift):
    model = make_model(logits_shift=logits_shift)
    length = 16
    ids = random_ids(2, length)
    base = logits(model, ids)
    for start in range(0, length, BLOCK):
        changed = ids.clone()
        changed[:, start:] = random_ids(2, length - start, seed=start + 7)
        # under the shift, a block's first logits read the block before (position 0 reads itself)
        kept = start + 1 if logits_shift and start else start
        out = logits(model, changed)
        assert torch.allclose(out[:, :kept], base[:, :kept], atol=1e-6, rtol=0), start
        # one token inside the block: every position of that block moves (under the shift, all but the block's
        # first position, which reads the previous block)
        one = ids.clone()
        one[:, start + 1] = (ids[:, start + 1] + 5) % MASK
        out = logits(model, one)
        for p in range(kept, start + BLOCK):
            assert (out[:, p] - base[:, p]).abs().amax(-1).min() > 1e-4, p
        assert torch.allclose(out[:, :kept], base[:, :kept], atol=1e-6, rtol=0), start


@pytest.mark.parametrize("logits_shift", [False, True])
def test_padded_rows_give_the_logits_of_the_rows_alone(logits_shift):
    """Left and right padding: the block grid follows the row's own positions."""
    model = make_model(logits_shift=logits_shift, time_conditioning=True)
    ids = random_ids(3, 14)
    ids, mask = left_padded(ids, [0, 5, 9])
    ids[0, 11:], mask[0, 11:] = 0, 0  # row 0: right padding
    t = torch.tensor([0.3, 0.6, 0.9])
    out = logits(model, ids, attention_mask=mask, timesteps=t)
    for row in range(3):
        real = mask[row].bool()
        alone = logits(model, ids[row : row + 1, real], timesteps=t[row : row + 1])[0]
        assert (out[row, real] - alone).abs().max() < 1e-5, row


def run_implementations(model, ids, mask, t):
    """Logits of one padded batch without a cache, and of a block against a prefilled cache."""
    out = {"full": logits(model, ids, attention_mask=mask, timesteps=t)}
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :8], attention_mask=mask[:, :8], timesteps=t, past_key_values=cache, use_cache=True)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    out["cached"] = logits(
        model,
        ids[:, 8:16],
        attention_mask=mask[:, :16],
        position_ids=positions[:, 8:16],
        timesteps=t,
        past_key_values=cache,
    )
    return out


def test_attention_implementations_agree_on_the_block_pattern():
    model = make_model(time_conditioning=True)
    ids, mask = left_padded(random_ids(3, 16), [0, 4, 8])
    t = torch.tensor([0.2, 0.5, 0.9])
    reference = run_implementations(model, ids, mask, t)
    model.set_attn_implementation("eager")
    eager = run_implementations(model, ids, mask, t)
    for key in reference:
        assert (eager[key] - reference[key]).abs().max() < 1e-5, key
    model.set_attn_implementation("flex_attention")
    try:
        flex = run_implementations(model, ids, mask, t)
    except Exception as err:  # noqa: BLE001 - only torch's own refusal of CPU flex attention skips
        if "cpu" in str(err).lower() and "support" in str(err).lower():
            pytest.skip(f"torch does not run flex attention on this CPU: {err}")
        raise
    for key in reference:
        assert (flex[key] - reference[key]).abs().max() < 1e-5, key


def test_flash_attention_and_the_scatter_cache_are_refused():
    model = make_model()
    ids = random_ids(2, 8)
    with pytest.raises(ValueError, match="DFMBlockCache"):
        model(input_ids=ids, past_key_values=DFMBlockCache(), use_cache=True)
    with pytest.raises(ValueError, match="past_key_values"):
        model(input_ids=ids, past_key_values=[(torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8))] * 2)
    model.config._attn_implementation = "flash_attention_2"  # the mask builder refuses before any kernel runs
    with pytest.raises(ValueError, match="block_size=4"):
        model(input_ids=ids)


@pytest.mark.parametrize("logits_shift", [False, True])
@pytest.mark.parametrize("pads", [[0, 0], [4, 8]], ids=["plain", "left-padded"])
def test_exact_cache_appends_and_crops(logits_shift, pads):
    """Prefill whole blocks, run the next block against the cache, crop; then run ``[finished block | next block]``,
    which appends both, and crop to keep the finished one: every logit equals the full block-causal forward's (under
    the shift, the first position of a block run alone reads the previous block, which is not in the slice: left
    out)."""
    model = make_model(logits_shift=logits_shift, time_conditioning=True)
    length = 20
    ids, mask = left_padded(random_ids(2, length), pads)  # pads are whole blocks: the prefix ends on a block edge
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    t = torch.tensor([0.3, 0.7])
    full = logits(model, ids, attention_mask=mask, timesteps=t)
    real = mask.bool()

    def check(out, start, end):
        first = start + 1 if logits_shift else start
        got, want = out[:, first - start :], full[:, first:end]
        assert (got - want)[real[:, first:end]].abs().max() < 1e-5, (start, end)

    def step(start, end):
        return logits(
            model,
            ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            timesteps=t,
            past_key_values=cache,
        )

    with torch.no_grad():
        out = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], timesteps=t, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 8
    check(out.logits, 0, 8)
    check(step(8, 12), 8, 12)  # the open block against the cache
    assert cache.get_seq_length() == 12
    crop_cache(cache, 8)
    check(step(8, 12), 8, 12)  # again (a second denoising step): the same cache, the same logits
    crop_cache(cache, 8)
    out = step(8, 16)  # [finished block | next block]: both appended, the next block's first logits included
    assert (out[:, 1:] - full[:, 9:16])[real[:, 9:16]].abs().max() < 1e-5
    assert cache.get_seq_length() == 16
    crop_cache(cache, 12)  # keep the finished block
    check(step(12, 16), 12, 16)
    crop_cache(cache, 16)  # a no-op: the length kept is the length held
    check(step(16, 20), 16, 20)
    assert cache.get_seq_length() == 20
    with pytest.raises(ValueError, match="length"):
        crop_cache(cache, 21)
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=ids[:, :4], attention_mask=mask, timesteps=t, past_key_values=cache)


@pytest.mark.parametrize("logits_shift", [False, True])
def test_training_layout_equals_a_loop_of_block_forwards(logits_shift):
    """``[x_t | x_0]`` with :func:`block_diffusion_training_mask`: the noisy half's logits equal, block by block, a
    forward of ``[clean earlier blocks | noisy block]`` (under the shift, a block's first token reads the clean half,
    as in generation)."""
    model = make_model(logits_shift=logits_shift)
    length = 12
    x0 = random_ids(2, length)
    xt = x0.masked_fill(torch.rand(2, length, generator=torch.Generator().manual_seed(3)) < 0.5, MASK)
    pos = torch.arange(length)
    mask = block_diffusion_training_mask(pos, BLOCK)
    vectorized = logits(
        model, torch.cat([xt, x0], 1), attention_mask=mask, position_ids=torch.cat([pos, pos])[None].expand(2, -1)
    )[:, :length]
    for start in range(0, length, BLOCK):
        loop = logits(model, torch.cat([x0[:, :start], xt[:, start : start + BLOCK]], 1))[:, start:]
        assert (vectorized[:, start : start + BLOCK] - loop).abs().max() < 1e-5, start


def test_a_forward_may_use_a_larger_multiple_of_the_block_size():
    """``block_size=`` of a forward: a multiple of the model's, the pattern of that block length (cache included)."""
    model = make_model(time_conditioning=True)
    wide = make_model(block_size=2 * BLOCK, time_conditioning=True)
    ids, mask = left_padded(random_ids(2, 16), [0, 8])
    t = torch.tensor([0.4, 0.8])
    expected = logits(wide, ids, attention_mask=mask, timesteps=t)
    got = logits(model, ids, attention_mask=mask, timesteps=t, block_size=2 * BLOCK)
    assert (got - expected).abs().max() < 1e-6
    assert (logits(model, ids, attention_mask=mask, timesteps=t) - expected).abs().max() > 1e-3
    with torch.no_grad():
        cache = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], timesteps=t, use_cache=True, block_size=8)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    cached = logits(
        model,
        ids[:, 8:],
        attention_mask=mask,
        position_ids=positions[:, 8:],
        timesteps=t,
        past_key_values=cache.past_key_values,
        block_size=2 * BLOCK,
    )
    assert (cached[:, 1:] - expected[:, 9:])[mask[:, 9:].bool()].abs().max() < 1e-5
    for bad in (6, 0, 2.0):
        with pytest.raises(ValueError, match="block_size"):
            model(input_ids=ids, block_size=bad)
    with pytest.raises(ValueError, match="block_size"):
        make_model(block_size=None)(input_ids=ids, block_size=BLOCK)
