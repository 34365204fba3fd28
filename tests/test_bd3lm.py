"""BD3-LM and MDLM checkpoints (``model_type: "bd3lm"`` / ``"mdlm"``): the DiT body, SUBS, conversion, presets.

Tiny checkpoints are written in the exact Hub format (``backbone.*`` names, BD3-LM's ``sampling_eps_*`` and
``rotary_emb.inv_freq`` buffers, the config keys of kuleshov-group's ``configuration_bd3lm.py`` /
``configuration_mdlm.py``), every weight random. The logits are checked against a reference written here from the
published formulas (DiT with adaLN, bias-free LayerNorm, fused-qkv RoPE, GELU-tanh MLP; BD3-LM's sampling mask
``block(q) >= block(k)``), and greedy block generation against a reference sampler written from BD3-LM's
block-by-block algorithm.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dfm_hf import DFMPipeline
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration

try:
    from .conversion_helpers import save_tokenizer, write_checkpoint
    from .helpers import tiny_tokenizer
except ImportError:
    from conversion_helpers import save_tokenizer, write_checkpoint
    from helpers import tiny_tokenizer

HIDDEN, HEADS, LAYERS, COND, LENGTH, BLOCK = 32, 4, 2, 24, 32, 4
VOCAB = 385  # the 384-token test tokenizer + the mask token, last, as GPT-2's 50257
MASK = VOCAB - 1


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hub_config(model_type: str = "bd3lm", **overrides) -> dict:
    """A config.json as kuleshov-group's Hub checkpoints write it."""
    config = {
        "model_type": model_type,
        "architectures": ["BD3LM" if model_type == "bd3lm" else "MDLM"],
        "vocab_size": VOCAB,
        "model_length": LENGTH,
        "hidden_dim": HIDDEN,
        "cond_dim": COND,
        "n_blocks": LAYERS,
        "n_heads": HEADS,
        "dropout": 0.1,
        "time_conditioning": False,
        "return_dict": False,
        "torch_dtype": "float32",
    }
    if model_type == "bd3lm":
        config.update(
            block_size=BLOCK,
            cross_attn=True,
            adaln=True,
            attn_backend="flex",
            causal=False,
            var_min=True,
            sampling_eps_min=1e-3,
            sampling_eps_max=0.999,
        )
    config.update(overrides)
    return config


def hub_tensors(seed: int = 0, buffers: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under BD3-LM / MDLM's names (matrices ~ N(0, 0.2), norm scales ~ 1 + N(0, 0.2))."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, around=0.0):
        return torch.randn(*shape, generator=gen) * 0.2 + around

    t = {
        "backbone.vocab_embed.embedding": rand(VOCAB, HIDDEN),
        "backbone.sigma_map.mlp.0.weight": rand(COND, 256),
        "backbone.sigma_map.mlp.0.bias": rand(COND),
        "backbone.sigma_map.mlp.2.weight": rand(COND, COND),
        "backbone.sigma_map.mlp.2.bias": rand(COND),
        "backbone.output_layer.norm_final.weight": rand(HIDDEN, around=1.0),
        "backbone.output_layer.adaLN_modulation.weight": rand(2 * HIDDEN, COND),
        "backbone.output_layer.adaLN_modulation.bias": rand(2 * HIDDEN),
        "backbone.output_layer.linear.weight": rand(VOCAB, HIDDEN),
        "backbone.output_layer.linear.bias": rand(VOCAB),
    }
    for i in range(LAYERS):
        b = f"backbone.blocks.{i}."
        t.update(
            {
                b + "norm1.weight": rand(HIDDEN, around=1.0),
                b + "attn_qkv.weight": rand(3 * HIDDEN, HIDDEN),
                b + "attn_out.weight": rand(HIDDEN, HIDDEN),
                b + "norm2.weight": rand(HIDDEN, around=1.0),
                b + "mlp.0.weight": rand(4 * HIDDEN, HIDDEN),
                b + "mlp.0.bias": rand(4 * HIDDEN),
                b + "mlp.2.weight": rand(HIDDEN, 4 * HIDDEN),
                b + "mlp.2.bias": rand(HIDDEN),
                b + "adaLN_modulation.weight": rand(6 * HIDDEN, COND),
                b + "adaLN_modulation.bias": rand(6 * HIDDEN),
            }
        )
    if buffers:
        head_dim = HIDDEN // HEADS
        t["backbone.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        t["sampling_eps_min"] = torch.tensor(1e-3)
        t["sampling_eps_max"] = torch.tensor(0.999)
    return t


def write_hub_checkpoint(folder, model_type="bd3lm", shards=1, seed=0, tokenizer=True, **overrides):
    tensors = hub_tensors(seed, buffers=model_type == "bd3lm")
    if model_type == "mdlm":
        tensors["backbone.rotary_emb.inv_freq"] = hub_tensors(seed)["backbone.rotary_emb.inv_freq"]
    write_checkpoint(str(folder), tensors, hub_config(model_type, **overrides), shards=shards)
    if tokenizer:
        save_tokenizer(tiny_tokenizer(), str(folder))
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# The reference: BD3-LM / MDLM's forward written from the published formulas, over the Hub tensors
# ---------------------------------------------------------------------------------------------------------------------


def reference_logits(t, ids, sigma, block_size=None, subs=False):
    """DiT logits of ``ids (B, L)`` at noise levels ``sigma (B,)``; ``block_size``: the sampling mask
    ``block(q) >= block(k)`` (blocks from position 0), None: full attention."""
    batch, length = ids.shape
    head_dim = HIDDEN // HEADS

    def layer_norm(x, w):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w

    def linear(x, name, bias=True):
        out = x @ t[name + ".weight"].T
        return out + t[name + ".bias"] if bias else out

    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    args = sigma[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = linear(F.silu(linear(emb, "backbone.sigma_map.mlp.0")), "backbone.sigma_map.mlp.2")
    c = F.silu(c)[:, None, :]

    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(length).float()[:, None] * inv[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # (B, L, H, D)
        rot = torch.cat([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], -1)
        return x * cos[None, :, None] + rot * sin[None, :, None]

    if block_size is None:
        allowed = torch.ones(length, length, dtype=torch.bool)
    else:
        blocks = torch.arange(length) // block_size
        allowed = blocks[:, None] >= blocks[None, :]

    x = t["backbone.vocab_embed.embedding"][ids]
    for i in range(LAYERS):
        b = f"backbone.blocks.{i}."
        mod = linear(c, b + "adaLN_modulation").chunk(6, -1)
        h = layer_norm(x, t[b + "norm1.weight"]) * (1 + mod[1]) + mod[0]
        qkv = linear(h, b + "attn_qkv", bias=False).view(batch, length, 3, HEADS, head_dim)
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, HIDDEN)
        x = x + mod[2] * linear(attn, b + "attn_out", bias=False)
        h = layer_norm(x, t[b + "norm2.weight"]) * (1 + mod[4]) + mod[3]
        x = x + mod[5] * linear(F.gelu(linear(h, b + "mlp.0"), approximate="tanh"), b + "mlp.2")
    shift, scale = linear(c, "backbone.output_layer.adaLN_modulation").chunk(2, -1)
    x = layer_norm(x, t["backbone.output_layer.norm_final.weight"]) * (1 + scale) + shift
    logits = linear(x, "backbone.output_layer.linear")
    if subs:  # MDLM's SUBS, in log-probabilities
        logits[..., MASK] = float("-inf")
        logits = logits.log_softmax(-1)
        keep = ids != MASK
        logits[keep] = float("-inf")
        logits[keep, ids[keep]] = 0.0
    return logits


def random_ids(seed=1, batch=3, length=LENGTH):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, MASK, (batch, length), generator=gen)
    ids[:, length // 2 :] = MASK
    ids[1, 3] = MASK
    return ids


def raw_logits(model, ids, **kwargs):
    """Our logits without the SUBS step (the released modeling files return these)."""
    model.config.subs_parameterization = False
    try:
        with torch.no_grad():
            return model(ids, **kwargs).logits
    finally:
        model.config.subs_parameterization = True


# ---------------------------------------------------------------------------------------------------------------------
# Conversion and logits
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bd3lm_checkpoint_logits_match_the_reference_block_causal(tmp_path, attn):
    folder = write_hub_checkpoint(tmp_path / "bd3lm")
    model = DFMForMaskedGeneration.from_pretrained(folder, attn_implementation=attn)
    c = model.config
    assert (c.body, c.block_size, c.mask_token_id, c.cond_dim, c.intermediate_size) == ("dit", BLOCK, MASK, COND, 128)
    assert c.subs_parameterization and not c.tie_word_embeddings and not c.logits_shift
    assert c.max_position_embeddings == LENGTH and c.hidden_dropout == 0.1
    ids = random_ids()
    t = hub_tensors()
    expected = reference_logits(t, ids, torch.zeros(3), block_size=BLOCK)
    ours = raw_logits(model, ids, timesteps=torch.tensor([0.1, 0.5, 0.9]))  # time_conditioning false: ignored
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    # block-causal: a later block cannot change an earlier one's logits; full attention would
    changed = ids.clone()
    changed[:, -1] = 5
    with torch.no_grad():
        assert torch.equal(raw_logits(model, changed)[:, : LENGTH - BLOCK], ours[:, : LENGTH - BLOCK])
    full = reference_logits(t, ids, torch.zeros(3), block_size=None)
    assert not torch.allclose(full, expected, atol=1e-3)


def test_subs_parameterization_matches_mdlm(tmp_path):
    model = DFMForMaskedGeneration.from_pretrained(write_hub_checkpoint(tmp_path / "m"))
    ids = random_ids()
    with torch.no_grad():
        logits = model(ids).logits
    expected = reference_logits(hub_tensors(), ids, torch.zeros(3), block_size=BLOCK, subs=True)
    assert torch.equal(logits.isinf(), expected.isinf())
    torch.testing.assert_close(logits.log_softmax(-1), expected, rtol=1e-4, atol=1e-4)
    assert (logits[..., MASK] == float("-inf")).all()
    unmasked = ids != MASK
    assert torch.equal(logits[unmasked].argmax(-1), ids[unmasked])
    # packed logits_to_keep reads the ids at the kept positions
    keep = ~unmasked
    with torch.no_grad():
        packed = model(ids, logits_to_keep=keep).logits
    torch.testing.assert_close(packed, logits[keep])


@pytest.mark.parametrize("shards", [1, 3])
def test_mdlm_checkpoint_is_full_attention(tmp_path, shards):
    folder = write_hub_checkpoint(tmp_path / "mdlm", model_type="mdlm", shards=shards)
    model = DFMForMaskedGeneration.from_pretrained(folder)
    assert model.config.block_size is None and model.config.body == "dit"
    ids = random_ids(seed=3)
    expected = reference_logits(hub_tensors(), ids, torch.zeros(3))
    torch.testing.assert_close(raw_logits(model, ids), expected, rtol=1e-4, atol=1e-4)
    # a BD3-LM config without cross_attn has no mask in its forward: full attention as well
    bd3 = DFMForMaskedGeneration.from_pretrained(write_hub_checkpoint(tmp_path / "b", cross_attn=False))
    assert bd3.config.block_size is None


def test_time_conditioning_maps_our_time_to_sigma(tmp_path):
    folder = write_hub_checkpoint(tmp_path / "tc", time_conditioning=True)
    model = DFMForMaskedGeneration.from_pretrained(folder)
    ids = random_ids()
    t = torch.tensor([1.0, 0.25, 0.0])  # clean fraction; BD3-LM's move chance p = 1 - t, sigma = -log(1 - p)
    sigma = torch.tensor([0.0, -math.log(0.25), -math.log(1e-3)])  # clipped at sigma_max = -log(eps)
    expected = reference_logits(hub_tensors(), ids, sigma, block_size=BLOCK)
    torch.testing.assert_close(raw_logits(model, ids, timesteps=t), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="timesteps"):
        model(ids)


def test_conversion_is_strict(tmp_path):
    folder = write_hub_checkpoint(tmp_path / "a", tokenizer=False)
    tensors = hub_tensors()
    del tensors["backbone.blocks.1.mlp.2.bias"]
    write_checkpoint(str(tmp_path / "b"), tensors, hub_config())
    with pytest.raises(ValueError, match=r"missing tensors: backbone\.blocks\.1\.mlp\.2\.bias"):
        DFMForMaskedGeneration.from_pretrained(tmp_path / "b")
    tensors = hub_tensors()
    tensors["backbone.extra"] = torch.zeros(2)
    write_checkpoint(str(tmp_path / "c"), tensors, hub_config())
    with pytest.raises(ValueError, match=r"unexpected tensors: backbone\.extra"):
        DFMForMaskedGeneration.from_pretrained(tmp_path / "c")
    for key, value in (("adaln", False), ("causal", True), ("attn_backend", "flash")):
        config = hub_config(**{key: value})
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"`{key}`"):
            DFMForMaskedGeneration.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(hub_config(n_heads=5)))
    with pytest.raises(ValueError, match="n_heads"):
        DFMForMaskedGeneration.from_pretrained(folder)


def test_dtype_device_map_and_roundtrip(tmp_path):
    folder = write_hub_checkpoint(tmp_path / "d")
    model = DFMForMaskedGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = random_ids()
    expected = reference_logits(hub_tensors(), ids, torch.zeros(3), block_size=BLOCK)
    error = (raw_logits(model, ids).float() - expected).abs().mean()
    assert error < 0.02 * expected.abs().mean()
    full = DFMForMaskedGeneration.from_pretrained(folder)
    full.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "dit.py").is_file()  # remote code: the DiT module travels with modeling_dfm.py
    again = DFMForMaskedGeneration.from_pretrained(tmp_path / "ours")
    assert again.config.body == "dit" and again.lm_head.bias is not None
    with torch.no_grad():
        assert torch.equal(again(ids).logits, full(ids).logits)


def test_dit_config_is_validated():
    base = dict(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(ValueError, match="`body`"):
        DFMConfig(**base, body="gpt")
    with pytest.raises(ValueError, match="`cond_dim`"):
        DFMConfig(**base, body="dit", tie_word_embeddings=False)
    with pytest.raises(ValueError, match="`cond_dim`"):
        DFMConfig(**base, cond_dim=8)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        DFMConfig(**base, body="dit", cond_dim=8)
    with pytest.raises(ValueError, match="mask_token_id"):
        DFMConfig(**base, subs_parameterization=True)
    with pytest.raises(ValueError, match="attention_bias"):
        DFMConfig(**base, body="dit", cond_dim=8, tie_word_embeddings=False, attention_bias=True)
    model = DFMForMaskedGeneration(DFMConfig(**base, body="dit", cond_dim=8, tie_word_embeddings=False))
    assert model.lm_head.bias is not None and model.model.time_embedding.linear_1.weight.shape == (8, 256)


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------


def reference_block_greedy(t, prompt, gen_length, block=BLOCK):
    """BD3-LM's block loop, greedy: blocks of masks appended one at a time (aligned at position 0 with the prompt),
    each block decoded one token a step, the most probable (SUBS) prediction among its masked positions committed,
    the whole sequence recomputed every step (no cache)."""
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], 1)
    total = x.shape[1]
    for start in range(0, total, block):
        end = min(start + block, total)
        while (x[:, start:end] == MASK).any():
            logits = reference_logits(t, x[:, :end], torch.zeros(1), block_size=block, subs=True)[0, start:end]
            probs = logits.softmax(-1)
            conf, tokens = probs.max(-1)
            conf = conf.masked_fill(x[0, start:end] != MASK, -1.0)
            pos = int(conf.argmax())
            x[0, start + pos] = tokens[pos]
    return x


def varied_tensors() -> dict[str, torch.Tensor]:
    """Weights whose greedy tokens vary along the sequence: small adaLN (its shift is the same at every position), no
    output bias, larger attention and output matrices."""
    tensors = hub_tensors()
    for name in tensors:
        if "adaLN" in name:
            tensors[name] = tensors[name] * 0.05
        elif name.endswith("attn_qkv.weight") or name.endswith("linear.weight"):
            tensors[name] = tensors[name] * 3
    tensors["backbone.output_layer.linear.bias"].zero_()
    return tensors


def test_greedy_block_generation_matches_the_reference_sampler(tmp_path):
    folder = write_checkpoint(str(tmp_path / "g"), varied_tensors(), hub_config())
    save_tokenizer(tiny_tokenizer(), folder)
    pipe = DFMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompt = torch.tensor([[5, 17, 40, 99, 12, 7]])
    gen = 10
    pipe.scheduler = pipe.scheduler_presets["bd3lm-first-hitting"].__class__(
        mask_token_id=MASK, vocab_size=VOCAB, remasking="low_confidence", temperature=0.0
    )
    steps = 3 * BLOCK  # the prompt's tail block and two more, one token a step
    out = pipe(input_ids=prompt, gen_length=gen, num_inference_steps=steps, output_type="pt")
    expected = reference_block_greedy(varied_tensors(), prompt, gen)
    assert len(set(expected[0, 6:].tolist())) > 2
    assert torch.equal(torch.as_tensor(out.sequences)[:, : expected.shape[1]], expected)
    uncached = pipe(input_ids=prompt, gen_length=gen, num_inference_steps=steps, output_type="pt", kv_cache=None)
    assert torch.equal(uncached.sequences, out.sequences) and uncached.nfe >= out.nfe


def test_pipeline_comes_with_the_family_presets(tmp_path):
    pipe = DFMPipeline.from_pretrained(write_hub_checkpoint(tmp_path / "p"))
    pipe.set_progress_bar_config(disable=True)
    assert {"bd3lm-first-hitting", "bd3lm-ddpm", "confidence", "cubic-euler"} <= set(pipe.scheduler_presets)
    assert pipe.scheduler.config.remasking == "random" and pipe.scheduler.config.temperature == 1.0
    assert pipe.scheduler.config.top_p == 0.9
    assert pipe.tokenizer.mask_token_id == MASK == pipe.model.config.mask_token_id
    prompt = [[5, 6, 7, 8, 9, 10]]
    seen = []

    def count(pipe_, step, t, kwargs):
        seen.append(int((kwargs["sample"] == MASK).sum()))
        return kwargs

    out = pipe(
        input_ids=prompt,
        gen_length=10,
        num_inference_steps=3 * BLOCK,  # L steps for each block (the prompt's tail block and two more)
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=count,
        callback_on_step_end_tensor_inputs=["sample"],
    )
    assert not (out.sequences == MASK).any()
    drops = [a - b for a, b in zip([10] + seen, seen)]
    assert set(drops) <= {0, 1} and sum(drops) == 10 and seen[-1] == 0  # first hitting: one token a step
    pipe.load_scheduler_preset("bd3lm-ddpm")
    ddpm = pipe(input_ids=prompt, gen_length=10, num_inference_steps=8, generator=torch.Generator().manual_seed(0))
    assert len(ddpm.texts) == 1
    mdlm = DFMPipeline.from_pretrained(write_hub_checkpoint(tmp_path / "m", model_type="mdlm"))
    assert "mdlm-ddpm" in mdlm.scheduler_presets and mdlm.scheduler.config.kappa_exponent == 1.0


def test_hub_repo_without_a_tokenizer_gets_gpt2s(tmp_path, hub_repo_id):
    """The released repos ship no tokenizer: GPT-2's is fetched (here from the loopback Hub) and gets ``[MASK]``."""
    from huggingface_hub import HfApi

    from dfm_hf.pipelines.released import DIT_TOKENIZER_REPO

    api = HfApi()
    tokenizer_folder = tmp_path / "gpt2"
    tiny_tokenizer().save_pretrained(tokenizer_folder)
    api.create_repo(DIT_TOKENIZER_REPO, exist_ok=True)
    api.upload_folder(folder_path=str(tokenizer_folder), repo_id=DIT_TOKENIZER_REPO)
    folder = write_hub_checkpoint(tmp_path / "repo", tokenizer=False)
    api.create_repo(hub_repo_id)
    api.upload_folder(folder_path=str(folder), repo_id=hub_repo_id)
    pipe = DFMPipeline.from_pretrained(hub_repo_id)
    assert pipe.tokenizer.mask_token_id == MASK and pipe.tokenizer.mask_token == "[MASK]"
    assert len(pipe.tokenizer) == VOCAB == pipe.model.config.vocab_size
