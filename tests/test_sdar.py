"""SDAR (``model_type: "sdar"``) loads natively: tiny checkpoints in its exact format (Qwen3 names and config keys plus
``block_size`` / ``mask_token_id``) convert on load, match transformers' Qwen3 run under the block-causal mask, load
strictly, and generate greedily exactly as SDAR's evaluation sampler (written below from its published algorithm)."""

from __future__ import annotations

import math

import pytest
import torch

from dfm_hf import DFMPipeline
from dfm_hf.conversion import sdar_config_to_dfm
from dfm_hf.models import DFMForMaskedGeneration
from dfm_hf.pipelines.released import RELEASED_PRESET_SPECS

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

ATOL = 1e-4
BLOCK = 4
HEAD_DIM = 16  # not hidden / heads (= 8): Qwen3 states its head width
MASK, EOS = 2, 1  # the test tokenizer's "<|mask|>" and eos


def qwen3_source(tied: bool = False, seed: int = 3) -> torch.nn.Module:
    """A random ``Qwen3ForCausalLM`` (GQA, q/k norms, head_dim 16); the mask token's head row zero."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        hidden_size=ch.HIDDEN,
        num_hidden_layers=ch.LAYERS,
        num_attention_heads=ch.HEADS,
        num_key_value_heads=ch.KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=ch.FFN,
        vocab_size=ch.ROWS,
        max_position_embeddings=ch.MAX_POS,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    model = ch.randomize(Qwen3ForCausalLM(config), seed)
    with torch.no_grad():
        model.get_output_embeddings().weight[MASK] = 0.0  # keep the mask token out of the arg-max (as SDAR's is)
    return model


def sdar_config(**overrides) -> dict:
    """An SDAR ``config.json`` with the keys of JetAstra/SDAR-4B-Chat's, at the tiny sizes."""
    config = {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_implementation": "flex_attention",
        "bos_token_id": EOS,
        "debug": False,
        "eos_token_id": EOS,
        "block_size": BLOCK,
        "mask_token_id": MASK,
        "ep_size": 1,
        "fuse_cross_entropy": True,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": ch.HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": ch.FFN,
        "max_position_embeddings": ch.MAX_POS,
        "max_window_layers": ch.LAYERS,
        "micro_forward": False,
        "model_type": "sdar",
        "num_attention_heads": ch.HEADS,
        "num_hidden_layers": ch.LAYERS,
        "num_key_value_heads": ch.KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "skip_checkpoint": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.52.4",
        "use_cache": False,
        "use_deepep": False,
        "use_sliding_window": False,
        "vocab_size": ch.ROWS,
    }
    config.update(overrides)
    return config


def sdar_folder(path, source, shards: int = 1, tokenizer: bool = False, tensors=None, **config) -> str:
    tensors = tensors or ch.dream_tensors(source)  # Qwen3's names are SDAR's
    folder = ch.write_checkpoint(
        str(path), tensors, sdar_config(tie_word_embeddings=source.config.tie_word_embeddings, **config), shards
    )
    if tokenizer:
        ch.save_tokenizer(ch.tiny_tokenizer(), folder)
    return folder


@pytest.fixture(scope="module")
def qwen3() -> torch.nn.Module:
    return qwen3_source()


@pytest.fixture(scope="module")
def sdar_pipe(tmp_path_factory, qwen3) -> DFMPipeline:
    pipe = DFMPipeline.from_pretrained(sdar_folder(tmp_path_factory.mktemp("sdar"), qwen3, tokenizer=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_diff(model, source) -> float:
    """Ours against Qwen3 under the additive block-causal mask (blocks from each row's first real token)."""
    ids, attention = ch.padded_batch(vocab=300)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=attention).logits.float()
        theirs = source(input_ids=ids, attention_mask=ch.block_causal_mask(attention, BLOCK)).logits.float()
    real = attention.bool()
    return float((ours[real] - theirs[real]).abs().max())


@pytest.mark.parametrize("shards", [1, 2])
def test_sdar_matches_block_causal_qwen3(tmp_path, qwen3, shards):
    model = DFMForMaskedGeneration.from_pretrained(sdar_folder(tmp_path, qwen3, shards=shards))
    config = model.config
    assert (config.block_size, config.qk_norm, config.head_dim, config.logits_shift) == (BLOCK, True, HEAD_DIM, False)
    assert (config.mask_token_id, config.eos_token_id, config.attention_bias) == (MASK, EOS, False)
    assert max_diff(model, qwen3) < ATOL


def test_sdar_tied_embeddings(tmp_path):
    source = qwen3_source(tied=True, seed=4)
    model = DFMForMaskedGeneration.from_pretrained(sdar_folder(tmp_path, source))
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert max_diff(model, source) < ATOL


def test_sdar_missing_qk_norm_is_named(tmp_path, qwen3):
    tensors = ch.dream_tensors(qwen3)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_norm\.weight"):
        DFMForMaskedGeneration.from_pretrained(sdar_folder(tmp_path, qwen3, tensors=tensors))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_experts": 8}, "num_experts"),
        ({"block_size": None}, "block_size"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_unsupported_sdar_config_is_refused(overrides, key):
    with pytest.raises(ValueError, match=f"`{key}`"):
        sdar_config_to_dfm(sdar_config(**overrides))


def test_sdar_pipeline_has_the_family_presets(sdar_pipe):
    assert isinstance(sdar_pipe.model, DFMForMaskedGeneration) and sdar_pipe.tokenizer.mask_token_id == MASK
    assert set(RELEASED_PRESET_SPECS["sdar"]) <= set(sdar_pipe.scheduler_presets)
    default = sdar_pipe.scheduler.config
    assert (default.confidence_threshold, default.temperature, default.block_length) == (None, 0.0, None)
    assert sdar_pipe.scheduler_presets["sdar-dynamic"].config.confidence_threshold == 0.95


# --------------------------------------------------------------------------------------------------------------------
# Greedy generation against SDAR's evaluation sampler
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sdar_reference(source, prompt: list[int], gen_length: int, steps: int, threshold: float = 1.0) -> list[int]:
    """SDAR's ``block_diffusion_generate`` (opencompass ``huggingface_bd3.py``), greedy (temperature 1, top-k 1),
    written from its published algorithm and run on the transformers Qwen3 under the block-causal mask without a
    cache (its cache is exact): the canvas runs to ``ceil((P + G) / B)`` blocks; the prompt's full blocks are given;
    every later block (the prompt's tail one included, its prompt positions fixed) takes at step ``s`` the
    ``k_s`` most confident masked positions (``k_s``: ``B`` split evenly over ``steps``), or, with ``threshold < 1``,
    every masked position above it when at least ``k_s`` are; confidence is the probability of the arg-max at
    temperature 1; it stops after a block holding the stop id. As in every sampler of ours, the mask token is never
    drawn (its logit is -inf; SDAR's code keeps it, which its trained models never pick)."""
    length = len(prompt)
    blocks = math.ceil((length + gen_length) / BLOCK)
    x = torch.full((1, blocks * BLOCK), MASK, dtype=torch.long)
    x[0, :length] = torch.tensor(prompt)
    k = [BLOCK // steps + (s < BLOCK % steps) for s in range(steps)]
    for b in range(length // BLOCK, blocks):
        lo, hi = b * BLOCK, (b + 1) * BLOCK
        for s in range(steps + 1):
            masked = x[0, lo:hi] == MASK
            if not bool(masked.any()):
                break
            attention = torch.ones(1, hi, dtype=torch.long)
            logits = source(input_ids=x[:, :hi], attention_mask=ch.block_causal_mask(attention, BLOCK)).logits[0, lo:hi]
            logits[:, MASK] = -math.inf
            probs = logits.float().softmax(-1)
            x0 = probs.argmax(-1)
            confidence = torch.where(masked, probs.gather(1, x0[:, None])[:, 0], -math.inf)
            high = confidence > threshold
            if threshold < 1.0 and int(high.sum()) >= k[s]:
                transfer = high
            else:
                transfer = torch.zeros_like(masked)
                transfer[confidence.topk(k[s]).indices] = True
            transfer &= masked
            x[0, lo:hi] = torch.where(transfer, x0, x[0, lo:hi])
        if bool((x[0, length:hi] == EOS).any()):
            return x[0, length:hi].tolist()
    return x[0, length:].tolist()


def check_against_reference(pipe, source, prompts, gen_length, threshold, kv_cache) -> None:
    from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

    preset = pipe.scheduler_presets["sdar-greedy" if threshold is None else "sdar-dynamic"]
    pipe.scheduler = ConfidenceUnmaskingScheduler.from_config(preset.config, confidence_threshold=threshold)
    blocks = math.ceil((len(prompts[0]) % BLOCK + gen_length) / BLOCK)  # equal prompt lengths: every row's count
    out = pipe(
        input_ids=prompts,
        gen_length=gen_length,
        num_inference_steps=BLOCK * blocks,  # SDAR's denoising_steps = block_length per block
        output_type="pt",
        return_full_text=False,
        kv_cache=kv_cache,
    )
    for row, prompt in enumerate(prompts):
        expected = sdar_reference(source, prompt, gen_length, BLOCK, 1.0 if threshold is None else threshold)
        expected = expected[:gen_length]
        got = out.sequences[row].tolist()
        assert got[: len(expected)] == expected, (row, got, expected)
        assert all(t == pipe.tokenizer.pad_token_id for t in got[len(expected) :])


@pytest.mark.parametrize("prompt_length", [6, 8])
@pytest.mark.parametrize("kv_cache", ["auto", None])
def test_sdar_greedy_generation_matches_its_sampler(sdar_pipe, qwen3, prompt_length, kv_cache):
    gen = torch.Generator().manual_seed(prompt_length)
    prompts = torch.randint(3, 300, (2, prompt_length), generator=gen).tolist()
    check_against_reference(sdar_pipe, qwen3, prompts, 10, None, kv_cache)


@pytest.mark.parametrize("threshold", [0.05, 0.2])
def test_sdar_dynamic_generation_matches_its_sampler(sdar_pipe, qwen3, threshold):
    gen = torch.Generator().manual_seed(11)
    prompts = torch.randint(3, 300, (1, 7), generator=gen).tolist()
    check_against_reference(sdar_pipe, qwen3, prompts, 12, threshold, "auto")


def test_sdar_rows_of_different_lengths(sdar_pipe, qwen3):
    """Rows of different prompt lengths in one batch (left-padded on the block grid, which SDAR's own sampler does not
    support) each give the tokens of SDAR's sampler run on that row alone."""
    from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 8, 10)]
    sdar_pipe.scheduler = ConfidenceUnmaskingScheduler.from_config(sdar_pipe.scheduler_presets["sdar-greedy"].config)
    blocks = max(math.ceil((len(p) % BLOCK + 9) / BLOCK) for p in prompts)
    out = sdar_pipe(input_ids=prompts, gen_length=9, num_inference_steps=BLOCK * blocks, output_type="pt")
    for row, prompt in enumerate(prompts):
        expected = prompt + sdar_reference(qwen3, prompt, 9, BLOCK)[:9]
        assert out.sequences[row].tolist()[: len(expected)] == expected


def test_sdar_dtype_device_map_and_our_format(tmp_path, qwen3):
    """``dtype=`` and ``device_map=`` are honoured; ``save_pretrained`` writes our format, which loads back equal."""
    folder = sdar_folder(tmp_path / "sdar", qwen3)
    model = DFMForMaskedGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": "cpu"})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = DFMForMaskedGeneration.from_pretrained(folder)
    model.save_pretrained(tmp_path / "ours")
    again = DFMForMaskedGeneration.from_pretrained(tmp_path / "ours")
    assert again.config.model_type == "dfm" and (again.config.block_size, again.config.qk_norm) == (BLOCK, True)
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
