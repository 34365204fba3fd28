"""Sampling modes: LLaDA's generate() with classifier-free guidance, Dream's confidences, threshold decoding."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_pipeline

from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler

MASK, VOCAB = 5, 6


def _llada_generate(model, prompt: torch.Tensor, gen_length: int, steps: int, block_length: int, cfg_scale: float,
                    mask_id: int) -> torch.Tensor:  # fmt: skip
    """LLaDA's ``generate()`` (greedy, low-confidence remasking, blocks, CFG), written from its published algorithm:
    per block ``steps / blocks`` steps, ``m // s`` tokens per step plus one for the first ``m % s``; under CFG a copy
    of ``x`` with the prompt masked is run alongside and ``logits = un + (cfg + 1) (cond - un)``."""
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), mask_id)], 1)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, : prompt.shape[1]] = True
    blocks = gen_length // block_length
    per_block = steps // blocks
    for b in range(blocks):
        lo = prompt.shape[1] + b * block_length
        hi = lo + block_length
        m = (x[:, lo:hi] == mask_id).sum(1)
        counts = [m // per_block + (j < m % per_block).long() for j in range(per_block)]
        for j in range(per_block):
            masked = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = model(torch.cat([x, un_x])).logits
                cond, un = both.chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x).logits
            logits[..., mask_id] = -math.inf  # a model that gives the mask token no mass (as LLaDA's never does)
            tokens = logits.argmax(-1)
            conf = torch.softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            conf[:, hi:] = -math.inf
            conf = torch.where(masked, conf, torch.full_like(conf, -math.inf))
            for r in range(x.shape[0]):
                top = conf[r].topk(int(counts[j][r])).indices
                x[r, top] = tokens[r, top]
    return x


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0, 2.5])
def test_pipeline_reproduces_llada_generate_token_for_token(cfg_scale):
    pipe = tiny_pipeline(seed=7)
    tok = pipe.tokenizer
    mask = tok.mask_token_id
    pipe.scheduler = ConfidenceUnmaskingScheduler(
        mask_token_id=mask, vocab_size=pipe.model.config.vocab_size, block_length=8, temperature=0.0
    )
    prompt = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _llada_generate(pipe.model, prompt, 24, 12, 8, cfg_scale, mask)
    out = pipe(input_ids=prompt, gen_length=24, num_inference_steps=12, guidance_scale=cfg_scale + 1.0,
               output_type="pt")  # fmt: skip
    assert torch.equal(out.sequences, ref)
    if cfg_scale:
        plain = pipe(input_ids=prompt, gen_length=24, num_inference_steps=12, output_type="pt").sequences
        assert not torch.equal(plain, ref)  # guidance changed the tokens (the test would catch a no-op)


def test_guidance_works_with_the_flow_sampler_skipping_and_logits_to_keep():
    pipe = tiny_pipeline(seed=3)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = dict(gen_length=10, num_inference_steps=40, output_type="pt", guidance_scale=2.0)
    fast = pipe(["def f(x):", "import os"], generator=[g(), g()], **kw)
    slow = pipe(["def f(x):", "import os"], generator=[g(), g()], skip_idle_steps=False, use_logits_to_keep=False,
                **kw)  # fmt: skip
    assert torch.equal(fast.sequences, slow.sequences) and fast.nfe < slow.nfe == 40
    off = pipe(["def f(x):", "import os"], generator=[g(), g()], **{**kw, "guidance_scale": 1.0})
    assert not torch.equal(off.sequences, fast.sequences)


def _scheduler(steps: int = 5, **kw) -> ConfidenceUnmaskingScheduler:
    s = ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=VOCAB, **kw)
    s.set_timesteps(steps)
    return s


def _logits(rows: list[list[float]]) -> torch.Tensor:
    """(1, len, VOCAB) logits whose softmax over tokens 0..4 is the given probability rows (mask excluded)."""
    p = torch.tensor(rows, dtype=torch.float64)
    logits = torch.full((1, p.shape[0], VOCAB), -1e9, dtype=torch.float64)
    logits[0, :, : p.shape[1]] = p.clamp_min(1e-12).log()
    return logits.float()


ROWS = [
    [0.95, 0.05, 0.0, 0.0, 0.0],  # p 0.95, margin 0.90, low entropy
    [0.40, 0.40, 0.20, 0.0, 0.0],  # p 0.40, margin 0.00
    [0.50, 0.10, 0.10, 0.10, 0.20],  # p 0.50, margin 0.30, high entropy
    [0.92, 0.08, 0.0, 0.0, 0.0],  # p 0.92, margin 0.84
    [0.60, 0.0, 0.40, 0.0, 0.0],  # p 0.60, margin 0.20, entropy 0.67 nats
]


def test_threshold_commits_every_confident_position_and_at_least_the_best():
    x = torch.full((1, 5), MASK)
    sched = _scheduler(confidence_threshold=0.9)
    out = sched.step(_logits(ROWS), sched.timesteps[0], x).prev_sample
    assert (out[0] != MASK).tolist() == [True, False, False, True, False]  # 0.95 and 0.92 pass 0.9
    sched = _scheduler(confidence_threshold=0.99)
    out = sched.step(_logits(ROWS), sched.timesteps[0], x).prev_sample
    assert (out[0] != MASK).tolist() == [True, False, False, False, False]  # none passes: the best one
    sched = _scheduler(steps=2, confidence_threshold=0.55)  # the schedule needs ceil(5 / 2) = 3 now
    out = sched.step(_logits(ROWS), sched.timesteps[0], x).prev_sample
    assert (out[0] != MASK).tolist() == [True, False, False, True, True]
    sched = _scheduler(steps=2, confidence_threshold=0.45)  # ... and 0.5 passes 0.45 too
    out = sched.step(_logits(ROWS), sched.timesteps[0], x).prev_sample
    assert (out[0] != MASK).tolist() == [True, False, True, True, True]
    fixed = _scheduler(steps=4)  # None: the fixed schedule, ceil(5 / 4) = 2 per step
    out = fixed.step(_logits(ROWS), fixed.timesteps[0], x).prev_sample
    assert (out[0] != MASK).tolist() == [True, False, False, True, False]
    with pytest.raises(ValueError, match="confidence_threshold"):
        _scheduler(confidence_threshold=0.5, remasking="random")
    with pytest.raises(ValueError, match="confidence_threshold"):
        _scheduler(confidence_threshold=float("nan"))


def test_confidence_modes_rank_by_probability_margin_and_negative_entropy():
    x = torch.full((1, 5), MASK)
    first = {}
    for mode in ("probability", "margin", "entropy"):
        sched = ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=VOCAB, confidence=mode)
        sched.set_timesteps(5)  # one token per step: the order of commits is the ranking
        order, y = [], x.clone()
        for t in sched.timesteps:
            new = sched.step(_logits(ROWS), t, y).prev_sample
            order.append(int((new != y).nonzero()[0, 1]))
            y = new
        first[mode] = order
    assert first["probability"] == [0, 3, 4, 2, 1]
    assert first["margin"] == [0, 3, 2, 4, 1]
    entropy = [-sum(p * math.log(p) for p in row if p > 0) for row in ROWS]
    assert first["entropy"] == sorted(range(5), key=lambda i: entropy[i])
    with pytest.raises(ValueError, match="confidence"):
        ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=VOCAB, confidence="topk")


def test_threshold_decoding_in_the_pipeline_runs_fewer_model_calls_and_finishes():
    pipe = tiny_pipeline(seed=2)
    v, m = pipe.model.config.vocab_size, pipe.tokenizer.mask_token_id
    blocks = lambda **kw: ConfidenceUnmaskingScheduler(mask_token_id=m, vocab_size=v, block_length=8, **kw)  # noqa: E731
    kw = dict(gen_length=32, num_inference_steps=32, output_type="pt")
    pipe.scheduler = blocks()
    fixed = pipe("def f(x):", **kw)
    assert fixed.nfe == 32 and not (fixed.sequences == m).any()
    pipe.scheduler = blocks(confidence_threshold=1.0)  # no probability exceeds 1: exactly the fixed schedule
    same = pipe("def f(x):", **kw)
    assert torch.equal(same.sequences, fixed.sequences) and same.nfe == 32
    pipe.scheduler = blocks(confidence_threshold=0.0)  # every draw passes: each block fills in its first step
    fast = pipe("def f(x):", **kw)
    assert not (fast.sequences == m).any() and fast.nfe == 4


def test_block_dfm_in_the_pipeline_fills_blocks_left_to_right():
    pipe = tiny_pipeline(seed=2)
    v, m = pipe.model.config.vocab_size, pipe.tokenizer.mask_token_id
    pipe.scheduler = DiscreteFlowScheduler(mask_token_id=m, vocab_size=v, block_length=4, corrector_alpha=2.0)
    seen = []

    def record(p, i, t, kw):
        seen.append((kw["sample"][0, -8:] == m).tolist())
        return {}

    pipe(input_ids=[[40, 41]], gen_length=8, num_inference_steps=6, callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["sample"], generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert all(seen[i][4:] == [True] * 4 for i in range(3))  # block 2 waits during block 1's 3 steps
    assert not any(seen[2][:4]) and not any(seen[-1])
