"""The key/value caches of DFMForMaskedGeneration (Fast-dLLM style prefix / dual caching), tiny CPU models.

A full forward with ``use_cache=True`` returns every layer's keys and values (a ``DynamicCache``, or the empty cache
passed in, e.g. a ``DFMBlockCache``, filled); a partial forward recomputes a slice of positions against that cache.
With a cache computed from the current tokens the partial forward is exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.cache_utils import Cache, DynamicCache

from dfm_hf.models import DFMBlockCache, DFMConfig, DFMForMaskedGeneration
from dfm_hf.models.cache import crop_cache

VOCAB = 64
MASK = 63
PAD = 0
LENGTH = 20


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(seed: int = 0, **overrides) -> DFMForMaskedGeneration:
    """A tiny adapted-LM-like model (GQA, q/k/v biases, head_dim given, shifted logits, untied head), random weights."""
    kwargs = dict(
        vocab_size=VOCAB,
        mask_token_id=MASK,
        pad_token_id=PAD,
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


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of LENGTH tokens, right padding in rows 1 and 2, masks in the generated part."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, MASK, (3, LENGTH), generator=g)
    ids[:, 10:] = torch.where(torch.rand(3, LENGTH - 10, generator=g) < 0.6, MASK, ids[:, 10:])
    mask = (torch.arange(LENGTH)[None] < torch.tensor([LENGTH, 17, 14])[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def cache_keys(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def slices(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row query positions ``(3, n)`` and the kept (predicted) positions among them.

    Rows open their block at different places; the position before the block is included (the shifted head reads it)
    and rows are padded to a common ``n`` by repeating their last position.
    """
    starts, width = [10, 12, 8], 4
    rows, keeps = [], []
    for start in starts:
        if kind == "prefix":  # everything from the block start (minus one, for the shift) to the end
            pos = list(range(start - 1, LENGTH))
        else:  # "dual": the block only (plus the shifted-in position)
            pos = list(range(start - 1, start + width))
        rows.append(pos)
        keeps.append([start <= p < start + width for p in pos])
    n = max(len(r) for r in rows)
    for pos, keep in zip(rows, keeps):
        keep.extend([False] * (n - len(pos)))
        pos.extend([pos[-1]] * (n - len(pos)))
    return torch.tensor(rows), torch.tensor(keeps)


def test_full_forward_returns_cache_of_rotated_keys_and_values():
    model = make_model()
    ids, mask = padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        plain = model(ids, attention_mask=mask)
    assert plain.past_key_values is None and model(ids, use_cache=False).past_key_values is None
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache) and out.cache is cache
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (3, 2, LENGTH, 8)
    torch.testing.assert_close(out.logits, plain.logits, atol=0.0, rtol=0.0)
    # layer 0 keys / values, recomputed by hand: k = rotary(k_proj(norm(embed(ids)))), v = v_proj(norm(embed(ids)))
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = attn.k_proj(x).view(3, LENGTH, 2, 8).transpose(1, 2)
        v = attn.v_proj(x).view(3, LENGTH, 2, 8).transpose(1, 2)
        inv_freq = 1.0 / (model.config.rope_theta ** (torch.arange(0, 8, 2).float() / 8))
        angles = torch.arange(LENGTH).float()[:, None] * inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        rotated = k * cos + torch.cat([-k[..., 4:], k[..., :4]], -1) * sin
    torch.testing.assert_close(cache.layers[0].keys, rotated, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache.layers[0].values, v, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["prefix", "dual"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_partial_forward_with_current_cache_is_exact(kind, attn_implementation):
    model = make_model()
    model.set_attn_implementation(attn_implementation)
    ids, mask = padded_batch()
    pos, keep = slices(kind)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True)
        before = cache_keys(full.past_key_values)
        partial = model(
            input_ids=ids.gather(1, pos),
            position_ids=pos,
            past_key_values=full.past_key_values,
            attention_mask=mask,
            logits_to_keep=keep,
        ).logits
        everything = model(
            input_ids=ids.gather(1, pos), position_ids=pos, past_key_values=full.past_key_values, attention_mask=mask
        ).logits
    expected = full.logits[torch.arange(3)[:, None].expand_as(pos)[keep], pos[keep]]
    assert partial.shape == (int(keep.sum()), VOCAB)
    assert (partial - expected).abs().max() < 1e-5
    assert (everything[keep] - expected).abs().max() < 1e-5
    # the cache passed in is not modified by a partial forward
    for (k0, v0), layer in zip(before, full.past_key_values.layers):
        assert torch.equal(layer.keys, k0) and torch.equal(layer.values, v0)


def test_partial_forward_time_conditioned_and_unshifted_models():
    for overrides in (dict(time_conditioning=True), dict(logits_shift=False, attention_bias=False, head_dim=None)):
        model = make_model(seed=2, **overrides)
        ids, mask = padded_batch(seed=3)
        pos, keep = slices("dual")
        t = torch.tensor([0.2, 0.5, 0.9]) if model.config.time_conditioning else None
        with torch.no_grad():
            full = model(ids, attention_mask=mask, timesteps=t, use_cache=True)
            partial = model(
                ids.gather(1, pos),
                attention_mask=mask,
                timesteps=t,
                position_ids=pos,
                past_key_values=full.past_key_values,
                logits_to_keep=keep,
            ).logits
        expected = full.logits[torch.arange(3)[:, None].expand_as(pos)[keep], pos[keep]]
        assert (partial - expected).abs().max() < 1e-5


def test_partial_forward_with_stale_cache_is_an_approximation_and_returns_an_updated_copy():
    model = make_model()
    ids, mask = padded_batch()
    pos = torch.arange(10, 14).expand(3, 4)
    with torch.no_grad():
        old = model(ids, attention_mask=mask, use_cache=True)
        new_ids = ids.clone()
        new_ids[:, 10:14] = torch.tensor([5, 6, 7, 8])  # tokens of the open block were committed since
        fresh = model(new_ids, attention_mask=mask, use_cache=True)
        approx = model(
            new_ids.gather(1, pos),
            attention_mask=mask,
            position_ids=pos,
            past_key_values=old.past_key_values,
            use_cache=True,
            logits_to_keep=(torch.arange(4) > 0).expand(3, 4),  # not 10: its source, 9, is not in the slice
        )
        exact = model(
            new_ids.gather(1, pos),
            attention_mask=mask,
            position_ids=pos,
            past_key_values=fresh.past_key_values,
            logits_to_keep=2,
        ).logits
    # with the refreshed cache it is exact; with the old one it only approximates (the other positions' keys are stale)
    torch.testing.assert_close(exact, fresh.logits[:, 12:14], atol=1e-5, rtol=1e-5)
    assert (approx.logits.view(3, 3, VOCAB) - fresh.logits[:, 11:14]).abs().max() > 1e-4
    # the returned cache is a new object: old entries everywhere except the fresh ones written at `pos`
    updated = approx.past_key_values
    assert updated is not old.past_key_values
    outside = torch.ones(LENGTH, dtype=torch.bool)
    outside[10:14] = False
    for layer_idx, (new_layer, old_layer) in enumerate(zip(updated.layers, old.past_key_values.layers)):
        assert torch.equal(new_layer.keys[:, :, outside], old_layer.keys[:, :, outside])
        assert not torch.allclose(new_layer.keys[:, :, 10:14], old_layer.keys[:, :, 10:14])
        if layer_idx == 0:  # the first layer's fresh keys only see their own tokens: they equal the refreshed cache
            torch.testing.assert_close(new_layer.keys[:, :, 10:14], fresh.past_key_values.layers[0].keys[:, :, 10:14])


def test_block_cache_is_rewritten_in_place_with_the_logits_of_a_copy():
    """A DFMBlockCache filled by a full forward is rewritten in place at the query positions by a partial forward, with
    bit-equal logits to the same partial forward reading a DynamicCache (written in a copy; the DynamicCache stays
    unmodified). Positions outside the queries keep their entries; a second call does not drift."""
    model = make_model(seed=6)
    ids, mask = padded_batch(seed=7)
    pos = torch.arange(10, 14).expand(3, 4)
    new_ids = ids.clone()
    new_ids[:, 10:14] = torch.tensor([5, 6, 7, 8])
    with torch.no_grad():
        copied = model(ids, attention_mask=mask, use_cache=True).past_key_values
        owned = DFMBlockCache()
        assert model(ids, attention_mask=mask, past_key_values=owned, use_cache=True).past_key_values is owned
        before, copied_before = cache_keys(owned), cache_keys(copied)
        storage = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in owned.layers]
        kept = (torch.arange(4) > 0).expand(3, 4)  # not position 10: its shifted source, 9, is not in the slice
        kw = dict(attention_mask=mask, position_ids=pos, logits_to_keep=kept)
        expected = model(new_ids.gather(1, pos), past_key_values=copied, **kw)
        in_place = model(new_ids.gather(1, pos), past_key_values=owned, **kw)
        again = model(new_ids.gather(1, pos), past_key_values=owned, **kw).logits
    assert isinstance(copied, DynamicCache) and isinstance(expected.past_key_values, DFMBlockCache)
    assert in_place.past_key_values is owned and expected.past_key_values is not copied
    torch.testing.assert_close(in_place.logits, expected.logits, atol=0.0, rtol=0.0)
    torch.testing.assert_close(again, expected.logits, atol=0.0, rtol=0.0)  # rewritten before read: no drift
    outside = torch.ones(LENGTH, dtype=torch.bool)
    outside[10:14] = False
    for (k0, v0), layer, copy, ptrs in zip(before, owned.layers, expected.past_key_values.layers, storage):
        assert (layer.keys.data_ptr(), layer.values.data_ptr()) == ptrs  # the same tensors, written in place
        assert torch.equal(layer.keys[:, :, outside], k0[:, :, outside])
        assert torch.equal(layer.values[:, :, outside], v0[:, :, outside])
        assert not torch.equal(layer.keys[:, :, 10:14], k0[:, :, 10:14])
        assert torch.equal(layer.keys, copy.keys) and torch.equal(layer.values, copy.values)
    for (k0, v0), layer in zip(copied_before, copied.layers):  # the DynamicCache read by the copy path is unchanged
        assert torch.equal(layer.keys, k0) and torch.equal(layer.values, v0)


def test_repeated_positions_are_harmless():
    model = make_model(seed=4)
    ids, mask = padded_batch(seed=5)
    pos = torch.tensor([[9, 10, 11, 12, 13, 13, 13], [9, 10, 11, 12, 13, 9, 11], [9, 10, 11, 12, 13, 10, 10]])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        repeated = model(ids.gather(1, pos), attention_mask=mask, position_ids=pos, past_key_values=cache).logits
        plain = model(
            ids.gather(1, pos[:, :5]), attention_mask=mask, position_ids=pos[:, :5], past_key_values=cache
        ).logits
    torch.testing.assert_close(repeated[:, :5], plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(repeated[0, 5], plain[0, 4], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(repeated[1, 6], plain[1, 2], atol=1e-6, rtol=1e-6)


def test_partial_forward_attentions_and_four_d_masks():
    """``output_attentions`` gives ``(batch, heads, n, L)``; a 4-D mask's rows at ``pos`` reproduce a causal model."""
    model = make_model(seed=6)
    ids, mask = padded_batch(seed=7)
    pos = torch.tensor([[10, 11, 12, 13]] * 3)  # 10: the shifted head reads it for 11
    causal = torch.tril(torch.ones(LENGTH, LENGTH, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = model(ids.gather(1, pos), position_ids=pos, past_key_values=None, use_cache=False)
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        partial = model(
            ids.gather(1, pos),
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            output_attentions=True,
            output_hidden_states=True,
        )
        full_causal = model(ids, attention_mask=additive, use_cache=True)
        rows = additive[torch.arange(3)[:, None], :, pos].transpose(1, 2)  # (batch, 1, n, L)
        partial_causal = model(
            ids.gather(1, pos), attention_mask=rows, position_ids=pos, past_key_values=full_causal.past_key_values
        ).logits
    assert out.logits.shape == (3, 4, VOCAB)  # without a cache: a short sequence of its own
    assert len(partial.attentions) == 2 and partial.attentions[0].shape == (3, 4, 4, LENGTH)
    assert len(partial.hidden_states) == 3 and partial.hidden_states[-1].shape == (3, 4, 48)
    weights = partial.attentions[-1]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 4))
    assert weights[1, :, :, 17:].abs().max() == 0 and weights[2, :, :, 14:].abs().max() == 0  # padded keys
    torch.testing.assert_close(partial_causal[:, 1:], full_causal.logits[:, 11:14], atol=1e-5, rtol=1e-5)


def test_cache_alias_and_pair_sequences():
    """``cache=`` (transformers 5.x name) and a plain sequence of (keys, values) pairs are accepted too."""
    model = make_model(seed=8)
    ids, mask = padded_batch()
    pos = torch.tensor([[12, 13, 14]] * 3)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        reference = model(ids.gather(1, pos), attention_mask=mask, position_ids=pos, past_key_values=cache).logits
        aliased = model(ids.gather(1, pos), attention_mask=mask, position_ids=pos, cache=cache).logits
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
        as_pairs = model(ids.gather(1, pos), attention_mask=mask, position_ids=pos, past_key_values=pairs).logits
        empty = DynamicCache()
        filled = model(ids, attention_mask=mask, past_key_values=empty, use_cache=True).past_key_values
    assert torch.equal(aliased, reference) and torch.equal(as_pairs, reference)
    assert filled is empty and torch.equal(filled.layers[1].keys, cache.layers[1].keys)  # an empty Cache is filled


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(position_ids=None), "position_ids"),
        (dict(attention_mask=torch.ones(3, 3, dtype=torch.long)), "attention_mask"),
        (dict(batch=2), "past_key_values"),
        (dict(layers=1), "past_key_values"),
        (dict(position_ids=torch.zeros(3, 4, dtype=torch.long)), "position_ids"),
    ],
)
def test_bad_cache_calls_raise_value_error_naming_the_argument(kwargs, name):
    model = make_model()
    ids, mask = padded_batch()
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    pairs = [(layer.keys, layer.values) for layer in cache.layers]
    pairs = [(k[: kwargs.get("batch", 3)], v[: kwargs.get("batch", 3)]) for k, v in pairs][: kwargs.get("layers", 2)]
    call = dict(
        input_ids=ids[:, 5:8], attention_mask=mask, position_ids=torch.arange(5, 8).expand(3, 3), past_key_values=pairs
    )
    call.update({k: v for k, v in kwargs.items() if k in call})
    with pytest.raises(ValueError, match=name):
        model(**call)


def test_gradient_checkpointing_with_partial_forward():
    model = make_model(seed=9).train()
    ids, mask = padded_batch()
    pos = torch.tensor([[9, 10, 11, 12]] * 3)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    labels = ids.gather(1, pos)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(labels, attention_mask=mask, position_ids=pos, past_key_values=cache, labels=labels, use_cache=True)
        assert out.past_key_values is not None
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated alias of activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()
    assert reference.keys() == checkpointed.keys() and len(reference) > 0
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_compiled_partial_forward_matches_eager():
    model = make_model(seed=10)
    ids, mask = padded_batch()
    pos, keep = slices("dual")
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        eager = model(
            ids.gather(1, pos), attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=keep
        ).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        logits = compiled(
            ids.gather(1, pos), attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=keep
        ).logits
    torch._dynamo.reset()
    torch.testing.assert_close(logits, eager, atol=1e-5, rtol=1e-5)


def test_forward_reads_nothing_back_from_the_device(monkeypatch):
    """No ``bool(tensor)`` / ``.item()`` / ``.tolist()`` / ``int(tensor)`` inside forward (each is a host sync on an
    accelerator): full and partial forwards with padding, times, int / index ``logits_to_keep`` and the cache."""
    model = make_model(seed=11, time_conditioning=True)
    ids, mask = padded_batch()
    pos, _ = slices("dual")
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, timesteps=t, use_cache=True).past_key_values

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside forward")

    with torch.no_grad(), monkeypatch.context() as patch:
        for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, host_read)
        model(ids, attention_mask=mask, timesteps=t, use_cache=True, logits_to_keep=3)
        model(ids, attention_mask=mask, timesteps=t, logits_to_keep=torch.tensor([1, 5]))
        model(
            ids, attention_mask=additive_mask_of(mask), timesteps=t, position_ids=torch.arange(LENGTH).expand(3, LENGTH)
        )
        model(
            ids.gather(1, pos),
            attention_mask=mask,
            timesteps=t,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )


def additive_mask_of(mask: torch.Tensor) -> torch.Tensor:
    """The bidirectional ``(batch, 1, L, L)`` additive mask of a ``(batch, L)`` padding mask."""
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def test_a_kept_position_without_its_shifted_source_raises():
    """Under ``logits_shift`` the logits of position ``p`` come from the hidden state at ``p - 1``, which a partial
    forward computes only when ``p - 1`` is in its slice (the cache holds keys and values, not hidden states): keeping
    ``p`` without it is refused, in every form of ``logits_to_keep``; the slice that includes it is exact."""
    model = make_model(seed=12)
    ids, mask = padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True)
        cache = full.past_key_values
        pos = torch.arange(10, 14).expand(3, 4)
        call = dict(input_ids=ids.gather(1, pos), attention_mask=mask, position_ids=pos, past_key_values=cache)
        for keep in (torch.ones(3, 4, dtype=torch.bool), torch.tensor([0, 2]), 4):
            with pytest.raises(ValueError, match=r"logits of position 10 \(row 0\).*position 9"):
                model(**call, logits_to_keep=keep)
        block = DFMBlockCache()
        model(ids, attention_mask=mask, past_key_values=block, use_cache=True)
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(**{**call, "past_key_values": block}, logits_to_keep=torch.ones(3, 4, dtype=torch.bool))
        # the positions whose source is in the slice are exact, and position 9 added to the slice makes 10 exact
        inner = model(**call, logits_to_keep=3).logits
        torch.testing.assert_close(inner, full.logits[:, 11:14], atol=1e-5, rtol=1e-5)
        wider = torch.arange(9, 14).expand(3, 5)
        keep = (torch.arange(5) > 0).expand(3, 5)
        out = model(ids.gather(1, wider), attention_mask=mask, position_ids=wider, past_key_values=cache,
                    logits_to_keep=keep).logits  # fmt: skip
        torch.testing.assert_close(out.view(3, 4, VOCAB), full.logits[:, 10:14], atol=1e-5, rtol=1e-5)
        # without the shift, and with every logit (the default), nothing is refused
        plain = make_model(seed=12, logits_shift=False)
        plain_cache = plain(ids, attention_mask=mask, use_cache=True).past_key_values
        plain(**{**call, "past_key_values": plain_cache}, logits_to_keep=torch.ones(3, 4, dtype=torch.bool))
        assert model(**call).logits.shape == (3, 4, VOCAB)


def test_a_block_model_reads_the_previous_block_only_from_its_slice():
    """A block model's first position of a block reads the previous block's last position, which a step against the
    cache holds as keys and values only: keeping it then raises; ``[finished block | open block]`` (what the
    block-diffusion pipeline runs when a block opens) includes it and is exact."""
    model = make_model(seed=13, block_size=4)
    ids = torch.randint(1, MASK, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :8], use_cache=True).past_key_values

        def step(start, end, keep):
            pos = torch.arange(start, end).expand(2, -1)
            return model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos, past_key_values=cache,
                         logits_to_keep=keep).logits  # fmt: skip

        with pytest.raises(ValueError, match=r"position 8 \(row 0\).*attends to"):
            step(8, 12, torch.ones(2, 4, dtype=torch.bool))
        assert cache.get_seq_length() == 8  # refused before anything was appended
        inner = step(8, 12, (torch.arange(4) > 0).expand(2, 4))
        torch.testing.assert_close(inner.view(2, 3, VOCAB), full[:, 9:12], atol=1e-5, rtol=1e-5)
        crop_cache(cache, 4)
        opening = step(4, 12, (torch.arange(8) >= 4).expand(2, 8))
        torch.testing.assert_close(opening.view(2, 4, VOCAB), full[:, 8:12], atol=1e-5, rtol=1e-5)


def test_a_time_conditioned_cache_carries_the_time_it_was_computed_at():
    """docs/fast_sampling.md: with the tokens unchanged, a partial forward at time ``t`` reading a cache computed at an
    earlier time is not the full forward at ``t`` (the cached keys and values carry their time); one computed at
    ``t`` (a refresh at every step) is."""
    model = make_model(seed=14, time_conditioning=True)
    ids, mask = padded_batch()
    pos, keep = slices("dual")
    early, late = torch.full((3,), 0.2), torch.full((3,), 0.8)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, timesteps=late, use_cache=True)
        stale = model(ids, attention_mask=mask, timesteps=early, use_cache=True).past_key_values
        call = dict(input_ids=ids.gather(1, pos), attention_mask=mask, timesteps=late, position_ids=pos,
                    logits_to_keep=keep)  # fmt: skip
        fresh = model(**call, past_key_values=full.past_key_values).logits
        aged = model(**call, past_key_values=stale).logits
    expected = full.logits[torch.arange(3)[:, None].expand_as(pos)[keep], pos[keep]]
    assert (fresh - expected).abs().max() < 1e-5
    assert (aged - expected).abs().max() > 1e-3
