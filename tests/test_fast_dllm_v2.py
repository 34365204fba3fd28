"""Fast-dLLM v2 (``model_type: "Fast_dLLM_Qwen"``) loads natively: tiny checkpoints in its exact format (Qwen2 names
and config keys plus ``bd_size``) convert on load, match transformers' Qwen2 run under the block-causal mask with the
logits shifted, load strictly, and generate greedily exactly as its sampler (written below from its published
algorithm, ``v2/generation_functions.py``): sub-blocks and the autoregressive first token of each block."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from dfm_hf import DFMPipeline
from dfm_hf.conversion import fast_dllm_v2_config_to_dfm
from dfm_hf.models import DFMForMaskedGeneration
from dfm_hf.pipelines.released import RELEASED_PRESET_SPECS
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

ATOL = 1e-4
BLOCK, SUB = 8, 4  # bd_size and small_block_size of the tests (32 and 8 in the released models)
MASK, EOS = 2, 1  # the test tokenizer's "<|mask|>" and eos


def qwen2_source(tied: bool = True, seed: int = 5) -> torch.nn.Module:
    """A random ``Qwen2ForCausalLM`` (q/k/v biases, tied like Fast_dLLM_v2_1.5B); the mask token's head row zero."""
    model = ch.qwen2_source(tied=tied, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight[MASK] = 0.0  # keep the mask token out of the arg-max
    return model


def fast_dllm_config(**overrides) -> dict:
    """A Fast-dLLM v2 ``config.json`` with the keys of Efficient-Large-Model/Fast_dLLM_v2_1.5B's, at the tiny sizes."""
    config = {
        "architectures": ["Fast_dLLM_QwenForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
            "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
        },
        "attention_dropout": 0.0,
        "bd_size": BLOCK,
        "bos_token_id": EOS,
        "eos_token_id": EOS,
        "hidden_act": "silu",
        "hidden_size": ch.HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": ch.FFN,
        "layer_types": ["full_attention"] * ch.LAYERS,
        "max_position_embeddings": ch.MAX_POS,
        "max_window_layers": ch.LAYERS,
        "model_type": "Fast_dLLM_Qwen",
        "num_attention_heads": ch.HEADS,
        "num_hidden_layers": ch.LAYERS,
        "num_key_value_heads": ch.KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.53.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": ch.ROWS,
        "mask_token_id": MASK,
    }
    config.update(overrides)
    return config


def fast_dllm_folder(path, source, shards: int = 1, tokenizer: bool = False, tensors=None, **config) -> str:
    tensors = tensors or ch.dream_tensors(source)  # Qwen2's names are Fast-dLLM v2's
    tied = source.config.tie_word_embeddings
    folder = ch.write_checkpoint(str(path), tensors, fast_dllm_config(tie_word_embeddings=tied, **config), shards)
    if tokenizer:
        ch.save_tokenizer(ch.tiny_tokenizer(), folder)
    return folder


@pytest.fixture(scope="module")
def qwen2() -> torch.nn.Module:
    return qwen2_source()


@pytest.fixture(scope="module")
def fast_pipe(tmp_path_factory, qwen2) -> DFMPipeline:
    pipe = DFMPipeline.from_pretrained(fast_dllm_folder(tmp_path_factory.mktemp("fast"), qwen2, tokenizer=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_diff(model, source) -> float:
    """Ours against Qwen2 under the additive block-causal mask, shifted (their output at i - 1 is our position i)."""
    ids, attention = ch.padded_batch(vocab=300)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=attention).logits.float()
        theirs = source(input_ids=ids, attention_mask=ch.block_causal_mask(attention, BLOCK)).logits.float()
    shifted = torch.cat([theirs[:, :1], theirs[:, :-1]], dim=1)
    real = attention.bool()
    return float((ours[real] - shifted[real]).abs().max())


@pytest.mark.parametrize("shards", [1, 2])
def test_fast_dllm_v2_matches_shifted_block_causal_qwen2(tmp_path, qwen2, shards):
    model = DFMForMaskedGeneration.from_pretrained(fast_dllm_folder(tmp_path, qwen2, shards=shards))
    config = model.config
    assert (config.block_size, config.logits_shift, config.attention_bias, config.qk_norm) == (BLOCK, True, True, False)
    assert (config.mask_token_id, config.eos_token_id, config.tie_word_embeddings) == (MASK, EOS, True)
    assert max_diff(model, qwen2) < ATOL


def test_fast_dllm_v2_untied_and_default_ids(tmp_path):
    source = qwen2_source(tied=False, seed=6)
    folder = fast_dllm_folder(tmp_path, source)
    model = DFMForMaskedGeneration.from_pretrained(folder)
    assert max_diff(model, source) < ATOL
    config = fast_dllm_config()
    del config["mask_token_id"], config["bd_size"], config["eos_token_id"]
    kwargs = fast_dllm_v2_config_to_dfm({**config, "vocab_size": 151936})
    assert (kwargs["mask_token_id"], kwargs["eos_token_id"], kwargs["block_size"]) == (151665, 151645, 32)


def test_fast_dllm_v2_missing_bias_is_named(tmp_path, qwen2):
    tensors = ch.dream_tensors(qwen2)
    del tensors["model.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.0\.self_attn\.v_proj\.bias"):
        DFMForMaskedGeneration.from_pretrained(fast_dllm_folder(tmp_path, qwen2, tensors=tensors))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"bd_size": 0}, "bd_size"),
        ({"rope_scaling": {"rope_type": "su"}}, "rope_scaling.rope_type"),
    ],
)
def test_unsupported_fast_dllm_v2_config_is_refused(overrides, key):
    with pytest.raises(ValueError, match=f"`{re.escape(key)}`"):
        fast_dllm_v2_config_to_dfm(fast_dllm_config(**overrides))


def test_fast_dllm_v2_pipeline_has_the_family_presets(fast_pipe):
    assert fast_pipe.tokenizer.mask_token_id == MASK
    assert set(RELEASED_PRESET_SPECS["fast_dllm_v2"]) <= set(fast_pipe.scheduler_presets)
    default = fast_pipe.scheduler.config
    assert (default.threshold_rule, default.confidence_threshold) == ("top1", 0.9)
    assert (default.sub_block_length, default.autoregressive_first_token, default.temperature) == (8, True, 0.0)


def test_fast_dllm_v2_from_the_hub(tmp_path, qwen2, fast_pipe, hub_repo_id):
    """The Hub layout (sharded, remote code beside it, never fetched) loads into a pipeline that generates as the
    folder's does."""
    from huggingface_hub import HfApi

    folder = fast_dllm_folder(tmp_path / "src", qwen2, shards=2, tokenizer=True)
    with open(os.path.join(folder, "modeling.py"), "w", encoding="utf-8") as f:
        f.write("raise SystemExit('remote code ran')\n")
    api = HfApi()
    api.create_repo(hub_repo_id)
    commit = api.upload_folder(repo_id=hub_repo_id, folder_path=folder).oid
    cache = str(tmp_path / "cache")
    pipe = DFMPipeline.from_pretrained(hub_repo_id, cache_dir=cache, revision=commit)
    pipe.set_progress_bar_config(disable=True)
    snapshot = os.path.join(cache, f"models--{hub_repo_id.replace('/', '--')}", "snapshots", commit)
    assert not [f for f in os.listdir(snapshot) if f.endswith(".py")]
    assert max_diff(pipe.model, qwen2) < ATOL
    fast_pipe.scheduler = ConfidenceUnmaskingScheduler.from_config(fast_pipe.scheduler_presets["fast-dllm-v2"].config)
    kwargs = dict(input_ids=[[5, 6, 7]], gen_length=12, output_type="pt")
    assert torch.equal(pipe(**kwargs).sequences, fast_pipe(**kwargs).sequences)


# --------------------------------------------------------------------------------------------------------------------
# Greedy generation against Fast-dLLM v2's sampler
# --------------------------------------------------------------------------------------------------------------------


def _forward(source, x: torch.Tensor) -> torch.Tensor:
    attention = torch.ones_like(x)
    logits = source(input_ids=x, attention_mask=ch.block_causal_mask(attention, BLOCK)).logits[0].float()
    logits[:, MASK] = -math.inf  # as in every sampler of ours, the mask token is never drawn
    return logits


@torch.no_grad()
def fast_dllm_reference(source, prompt: list[int], gen_length: int, threshold: float) -> list[int]:
    """Fast-dLLM v2's ``batch_sample`` for one row at temperature 0, written from its published algorithm and run on
    the transformers Qwen2 under the block-causal mask without a cache (its block cache is exact).

    Blocks of ``bd_size`` from position 0; the prompt's tail block is completed in place. When the prompt ends on a
    block boundary, the arg-max of the last prompt position's output is the next token. Inside a block, sub-blocks
    of ``small_block_size`` left to right; each step forwards the block, reads position ``i``'s logits at ``i - 1``
    (position 0 of the block its own), and commits every masked position of the sub-block whose arg-max
    probability exceeds ``threshold``, plus the most confident one. A complete block is forwarded once more and the
    arg-max of its last output is the first token of the next block (autoregressive). It stops after a block that
    holds the stop id (its code looks at the tokens committed by the diffusion steps only, so a stop token decoded
    autoregressively lets it run one block more; the tokens up to the first stop are the same). The mask token's
    logit is -inf (its code keeps it, which its trained models never pick)."""
    x = list(prompt)
    if len(x) % BLOCK == 0:
        x.append(int(_forward(source, torch.tensor([x]))[-1].argmax()))
    while len(x) < len(prompt) + gen_length:
        lo = len(x) // BLOCK * BLOCK
        canvas = torch.tensor([x + [MASK] * (lo + BLOCK - len(x))])
        for sub in range(0, BLOCK, SUB):
            while bool((canvas[0, lo + sub : lo + sub + SUB] == MASK).any()):
                out = _forward(source, canvas)[lo : lo + BLOCK]
                shifted = torch.cat([out[:1], out[:-1]])[sub : sub + SUB]
                probs = shifted.softmax(-1)
                x1 = probs.argmax(-1)
                masked = canvas[0, lo + sub : lo + sub + SUB] == MASK
                confidence = torch.where(masked, probs.gather(1, x1[:, None])[:, 0], -math.inf)
                commit = confidence > threshold
                commit[confidence.argmax()] = True
                commit &= masked
                canvas[0, lo + sub : lo + sub + SUB] = torch.where(commit, x1, canvas[0, lo + sub : lo + sub + SUB])
        x = canvas[0].tolist()
        if EOS in x[len(prompt) :]:
            break
        x.append(int(_forward(source, canvas)[-1].argmax()))
    return x[len(prompt) :]


def generate(pipe, prompts, gen_length, threshold, kv_cache):
    preset = pipe.scheduler_presets["fast-dllm-v2"]
    pipe.scheduler = ConfidenceUnmaskingScheduler.from_config(
        preset.config, confidence_threshold=threshold, sub_block_length=SUB
    )
    return pipe(
        input_ids=prompts,
        gen_length=gen_length,
        num_inference_steps=1,  # not binding under Fast-dLLM's rule
        output_type="pt",
        return_full_text=False,
        kv_cache=kv_cache,
    )


@pytest.mark.parametrize("prompt_length", [5, 8, 11, 16])
@pytest.mark.parametrize("kv_cache", ["auto", None])
def test_fast_dllm_v2_greedy_generation_matches_its_sampler(fast_pipe, qwen2, prompt_length, kv_cache):
    gen = torch.Generator().manual_seed(prompt_length)
    prompts = torch.randint(3, 300, (2, prompt_length), generator=gen).tolist()
    gen_length, threshold = 21, 0.05
    out = generate(fast_pipe, prompts, gen_length, threshold, kv_cache)
    for row, prompt in enumerate(prompts):
        expected = fast_dllm_reference(qwen2, prompt, gen_length, threshold)[:gen_length]
        got = out.sequences[row].tolist()
        assert got[: len(expected)] == expected, (row, got, expected)
        assert all(t == fast_pipe.tokenizer.pad_token_id for t in got[len(expected) :])


def test_fast_dllm_v2_rows_of_different_lengths(fast_pipe, qwen2):
    """Rows of different prompt lengths in one batch (left-padded on the block grid) each match the solo sampler."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 16, 10)]
    out = generate(fast_pipe, prompts, 17, 0.1, "auto")
    for row, prompt in enumerate(prompts):
        expected = fast_dllm_reference(qwen2, prompt, 17, 0.1)[:17]
        assert out.sequences[row].tolist()[: len(expected)] == expected


def test_autoregressive_first_token_commits_the_first_position_alone():
    """The block order of the scheduler: the first position of a block alone, then the first open sub-block."""
    scheduler = ConfidenceUnmaskingScheduler(
        mask_token_id=MASK,
        vocab_size=8,
        confidence_threshold=0.9,
        threshold_rule="top1",
        sub_block_length=2,
        autoregressive_first_token=True,
        block_length=6,
    )
    scheduler.set_timesteps(6)
    sample = torch.full((2, 6), MASK)
    sample[1, 0] = 5
    plan = scheduler.plan_step(sample, scheduler.timesteps[0])
    assert plan.positions.tolist() == [[True] + [False] * 5, [False, True] + [False] * 4]
    assert plan.commits.tolist() == [1, 1]


@pytest.mark.parametrize(
    "kwargs, name",
    [({"sub_block_length": 0}, "sub_block_length"), ({"autoregressive_first_token": 1}, "autoregressive_first_token")],
)
def test_block_order_options_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=8, **kwargs)
