"""Fast-dLLM's threshold rule (``ConfidenceUnmaskingScheduler(threshold_rule="top1")``): each step commits the most
confident masked position of the open block plus every one above the threshold, and a block takes as many steps as it
needs (``num_inference_steps`` is not binding). A reference written from Fast-dLLM's published algorithm (greedy,
LLaDA's blocks, with and without its dual cache) runs against the pipeline: the same tokens, the same model calls.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from helpers import tiny_tokenizer

from dfm_hf.generation.block_diffusion import block_layout
from dfm_hf.models import DFMBlockCache, DFMConfig, DFMForMaskedGeneration
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler

PROMPTS = ["def f(x):", "import os, sys\nclass A:", "x = 1"]
TAU = 0.3


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _pipe(block_size: Optional[int] = None, seed: int = 0) -> DFMPipeline:
    """A tiny random model whose head is scaled up, so that it is often sure of a token (the threshold fires)."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = DFMConfig.from_preset("tiny", tokenizer=tok, tie_word_embeddings=False, block_size=block_size)
    model = DFMForMaskedGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    scheduler = ConfidenceUnmaskingScheduler(mask_token_id=tok.mask_token_id, vocab_size=config.vocab_size)
    pipe = DFMPipeline(model=model, scheduler=scheduler, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _top1(pipe: DFMPipeline, block_length: Optional[int] = 4, tau: float = TAU, **kwargs) -> None:
    pipe.scheduler = ConfidenceUnmaskingScheduler.from_config(
        pipe.scheduler.config,
        block_length=block_length,
        confidence_threshold=tau,
        threshold_rule="top1",
        **kwargs,
    )


def _run(pipe: DFMPipeline, prompts, gen_length: int, steps: int, **kwargs):
    """The call's output and the positions each step committed (per step, summed over the rows)."""
    masks = []

    def count(p, i, t, callback_kwargs):
        masks.append(int((callback_kwargs["sample"] == p.mask_token_id).sum()))
        return {}

    out = pipe(
        prompts,
        gen_length=gen_length,
        num_inference_steps=steps,
        output_type="pt",
        return_full_text=False,
        callback_on_step_end=count,
        callback_on_step_end_tensor_inputs=["sample"],
        **kwargs,
    )
    rows = [prompts] if isinstance(prompts, str) else prompts
    start = gen_length * len(rows)  # the prompts hold no mask
    if pipe.model.config.block_size is not None:  # every row's last block is generated whole
        ids = [pipe.tokenizer(p, add_special_tokens=False)["input_ids"] for p in rows]
        layout = block_layout(ids, gen_length, pipe.model.config.block_size, pipe.mask_token_id, 0)
        start = int((layout.sample == pipe.mask_token_id).sum())
    return out, [a - b for a, b in zip([start] + masks, masks)]


def fast_dllm_reference(
    model: torch.nn.Module, prompt: list[int], gen_length: int, block_length: int, tau: float, dual: bool
) -> tuple[list[int], int]:
    """Fast-dLLM's greedy threshold decoding of one row, written from its published algorithm: blocks of
    ``block_length`` left to right; while the block holds masks, one forward, the arg-max at each masked position of
    the block (the mask token excluded) with its probability ``c``, then commit the most confident position and every
    one with ``c > tau``. With ``dual`` the forward that opens a block computes every position's keys and values and
    gives that step's logits; the block's later steps run only its positions against them."""
    mask = model.config.mask_token_id
    x = torch.tensor([prompt + [mask] * gen_length])
    nfe = 0
    for b in range(gen_length // block_length):
        lo, hi = len(prompt) + b * block_length, len(prompt) + (b + 1) * block_length
        cache = None
        while bool((x[0, lo:hi] == mask).any()):
            if not dual:
                logits = model(input_ids=x).logits[0, lo:hi]
            elif cache is None:
                cache = DFMBlockCache()
                logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, lo:hi]
            else:
                positions = torch.arange(lo, hi).unsqueeze(0)
                logits = model(input_ids=x[:, lo:hi], position_ids=positions, past_key_values=cache).logits[0]
            nfe += 1
            probs = logits.double().softmax(-1)
            probs[:, mask] = 0.0
            confidence, tokens = probs.max(-1)
            masked = x[0, lo:hi] == mask
            confidence = torch.where(masked, confidence, -math.inf)
            commit = masked & (confidence > tau)
            commit[int(confidence.argmax())] = True
            x[0, lo:hi] = torch.where(commit, tokens, x[0, lo:hi])
    return x[0, len(prompt) :].tolist(), nfe


def test_bad_threshold_rules_are_refused_clearly():
    base = dict(mask_token_id=2, vocab_size=384)
    with pytest.raises(ValueError, match=r"threshold_rule.*\['schedule', 'top1'\].*'top2'"):
        ConfidenceUnmaskingScheduler(**base, confidence_threshold=0.9, threshold_rule="top2")
    with pytest.raises(ValueError, match="threshold_rule.*confidence_threshold"):
        ConfidenceUnmaskingScheduler(**base, threshold_rule="top1")
    for schedule in ("fixed", "dream"):
        with pytest.raises(ValueError, match="threshold_rule.*transfer_schedule"):
            ConfidenceUnmaskingScheduler(
                **base, confidence_threshold=0.9, threshold_rule="top1", transfer_schedule=schedule
            )
    assert ConfidenceUnmaskingScheduler(**base).config.threshold_rule == "schedule"


def test_the_scheduler_says_how_many_steps_a_call_runs():
    base = dict(mask_token_id=2, vocab_size=384, confidence_threshold=0.9)
    schedule = ConfidenceUnmaskingScheduler(**base)
    top1 = ConfidenceUnmaskingScheduler(**base, threshold_rule="top1")
    flow = DiscreteFlowScheduler(mask_token_id=2, vocab_size=384)
    for asked in (1, 7, 64):
        assert schedule.inference_steps(asked, 12, 4) == flow.inference_steps(asked, 12, 4) == asked
        # one step per position of the widest window, whatever is asked
        assert top1.inference_steps(asked, 12, 4) == 12
        assert top1.inference_steps(asked, 10, 4) == 12  # 3 windows of up to 4 positions
        assert top1.inference_steps(asked, 10, None) == 10
        assert top1.inference_steps(asked, 3, 8) == 3
    with pytest.raises(ValueError, match="num_inference_steps"):
        top1.inference_steps(0, 12, 4)


@pytest.mark.parametrize("kv_cache", [None, "dual"])
def test_the_pipeline_reproduces_fast_dllm_tokens_and_model_calls(kv_cache):
    pipe = _pipe()
    _top1(pipe)
    several = 0
    for prompt in PROMPTS:
        ids = pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected, nfe = fast_dllm_reference(pipe.model, ids, 12, 4, TAU, dual=kv_cache == "dual")
        out, commits = _run(pipe, prompt, 12, 12, kv_cache=kv_cache)
        assert out.sequences[0].tolist() == expected
        assert out.nfe == nfe == sum(c > 0 for c in commits)  # one forward per step that commits
        several += sum(c > 1 for c in commits)
    assert several > 0  # the threshold fired: some steps committed more than the most confident position


def test_num_inference_steps_is_not_binding_and_blocks_take_the_steps_they_need():
    pipe = _pipe()
    _top1(pipe)
    runs = [_run(pipe, PROMPTS, 12, steps, kv_cache="dual") for steps in (1, 3, 12, 200)]
    for out, _ in runs[1:]:
        assert torch.equal(out.sequences, runs[0][0].sequences) and out.nfe == runs[0][0].nfe
    assert pipe.num_timesteps == 12  # one step per position of a block of 4, times 3 blocks
    out, commits = runs[0]
    assert len(commits) == 12 and out.nfe == sum(c > 0 for c in commits) <= 12
    assert max(commits) > 3  # a step committed more than one position in some row (3 rows)
    for b in range(3):  # every block is complete before the next opens: 4 positions x 3 rows each
        assert sum(commits[4 * b : 4 * b + 4]) == 12


def test_top1_is_the_even_rule_with_one_step_per_position():
    """Under ``"schedule"`` with the even transfer schedule and one step per generated position the schedule needs
    one commit a step: the same rule, so the same tokens and model calls."""
    pipe = _pipe()
    _top1(pipe)
    top1 = _run(pipe, PROMPTS, 12, 5)[0]
    pipe.scheduler = ConfidenceUnmaskingScheduler.from_config(pipe.scheduler.config, threshold_rule="schedule")
    schedule = _run(pipe, PROMPTS, 12, 12)[0]
    assert torch.equal(top1.sequences, schedule.sequences) and top1.nfe == schedule.nfe
    fewer = _run(pipe, PROMPTS, 12, 6)[0]  # "schedule" with fewer steps than positions: at least 2 a step
    assert fewer.nfe <= 6 < top1.nfe


def test_without_blocks_and_in_a_block_diffusion_model():
    pipe = _pipe()
    _top1(pipe, block_length=None)
    out, commits = _run(pipe, PROMPTS, 6, 2)
    assert len(commits) == 6 and out.nfe == sum(c > 0 for c in commits)
    assert not (out.sequences == pipe.mask_token_id).any()
    block = _pipe(block_size=4)
    _top1(block, block_length=None, tau=0.05)
    cached, commits = _run(block, PROMPTS, 9, 2)
    plain, _ = _run(block, PROMPTS, 9, 40, kv_cache=None)
    assert torch.equal(cached.sequences, plain.sequences)
    assert not (cached.sequences == block.mask_token_id).any()
    assert block.num_timesteps == 4 * 3  # a block of 4 gets 4 steps; up to 3 blocks a row
    assert cached.nfe == sum(c > 0 for c in commits) <= 12 and max(commits) > 3
