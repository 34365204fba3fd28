"""The approximate block key/value cache in DFMPipeline: exact machinery, the approximation, bad combinations."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_pipeline, tiny_tokenizer

from dfm_hf.generation.kv_cache import BlockCacheState, keep_in_slice, query_positions
from dfm_hf.generation.runner import ModelRunner
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler

PROMPTS = ["def f(x):", "import os, sys\nclass A:", "x = 1"]


def gens(n: int = 3) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


def _pipe(shift: bool = False, seed: int = 0) -> DFMPipeline:
    if not shift:
        return tiny_pipeline(seed=seed)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = DFMConfig.from_preset("tiny", tokenizer=tok, logits_shift=True, num_key_value_heads=2, attention_bias=True)
    model = DFMForMaskedGeneration(config).eval()
    scheduler = DiscreteFlowScheduler(mask_token_id=tok.mask_token_id, vocab_size=config.vocab_size)
    pipe = DFMPipeline(model=model, scheduler=scheduler, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _blocks(pipe: DFMPipeline, kind: str, block_length: int = 4):
    tok, vocab = pipe.tokenizer, pipe.model.config.vocab_size
    if kind == "confidence":
        return ConfidenceUnmaskingScheduler(
            mask_token_id=tok.mask_token_id, vocab_size=vocab, block_length=block_length
        )
    return DiscreteFlowScheduler(
        mask_token_id=tok.mask_token_id, vocab_size=vocab, block_length=block_length, corrector_alpha=2.0
    )


def test_query_layout_of_prefix_and_dual():
    window = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [0] * 6]).bool()
    dual = query_positions(window, "dual", logits_shift=False)
    assert dual.tolist() == [[2, 3], [4, 5], [0, 0]]
    assert query_positions(window, "dual", logits_shift=True).tolist() == [[1, 2, 3], [3, 4, 5], [0, 0, 0]]
    prefix = query_positions(window, "prefix", logits_shift=False)
    assert prefix.tolist() == [[2, 3, 4, 5], [4, 5, 5, 5], [0, 0, 0, 0]]
    needs = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0] * 6]).bool()
    assert keep_in_slice(needs, prefix).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "shifted-gqa-bias"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_partial_forward_against_a_fresh_cache_equals_the_full_forward(mode, shift):
    pipe = _pipe(shift)
    pipe.scheduler = _blocks(pipe, "confidence")
    sample, condition, attention, _ = pipe.prepare_inputs(PROMPTS, None, 12)
    drop = condition & attention.bool()
    for guidance in (1.0, 2.5):
        runner = ModelRunner(pipe.model, pipe.mask_token_id, attention, drop, True, True, guidance)
        sched = pipe.scheduler
        sched.set_timesteps(6)
        x = sample.clone()
        for t in sched.timesteps:
            plan = sched.plan_step(x, t, condition_mask=condition)
            state = BlockCacheState(mode, None)
            exact = runner.logits(x, plan)
            refreshed = runner.cached_logits(x, plan, state)  # the full forward that builds the cache
            assert state.refreshes == 1
            cached = runner.cached_logits(x, plan, state)  # the partial forward against it
            assert state.refreshes == 1
            for logits in (refreshed, cached):
                assert logits.shape == exact.shape
                assert torch.allclose(logits, exact, atol=1e-5, rtol=0), (logits - exact).abs().max()
            x = sched.step(exact, t, x, condition_mask=condition, plan=plan).prev_sample


@pytest.mark.parametrize("kind", ["confidence", "flow"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_refresh_every_step_gives_the_exact_tokens_and_a_stale_cache_one_forward_per_step(kind, mode):
    pipe = _pipe()
    pipe.scheduler = _blocks(pipe, kind)
    kw = dict(gen_length=12, num_inference_steps=12, output_type="pt")
    exact = pipe(PROMPTS, generator=gens(), **kw)
    reference = pipe(PROMPTS, generator=gens(), kv_cache=None, skip_idle_steps=False, use_logits_to_keep=False, **kw)
    assert torch.equal(exact.sequences, reference.sequences)  # kv_cache=None is the exact path
    fresh = pipe(PROMPTS, generator=gens(), kv_cache=mode, kv_cache_refresh_steps=1, **kw)
    assert torch.equal(fresh.sequences, exact.sequences)
    stale = pipe(PROMPTS, generator=gens(), kv_cache=mode, **kw)
    assert not (stale.sequences == pipe.tokenizer.mask_token_id).any()
    # one forward per step that reads logits: the refresh when a block opens gives that step's logits
    assert fresh.nfe == exact.nfe and stale.nfe == exact.nfe
    solo = pipe(PROMPTS[1], generator=gens()[1:2], kv_cache=mode, **kw)  # per-row generators: batch-invariant
    assert torch.equal(solo.sequences[0], stale.sequences[1, : solo.sequences.shape[1]])


@pytest.mark.parametrize("kind", ["confidence", "flow"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_stale_cache_refreshes_exactly_when_a_block_opens_and_its_logits_drift(kind, mode):
    """Along one exact trajectory: the cache is recomputed at the first step of each block and only then; logits
    read against it equal the exact ones at that step, and differ from them at a later step of the block (the cached
    keys/values predate the tokens committed since)."""
    pipe = _pipe()
    sched = _blocks(pipe, kind)
    sample, condition, attention, _ = pipe.prepare_inputs(PROMPTS, None, 12)
    runner = ModelRunner(pipe.model, pipe.mask_token_id, attention, condition & attention.bool(), True, True)
    sched.set_timesteps(12)
    state, x, g = BlockCacheState(mode, None), sample.clone(), gens()
    previous, opened, refreshed, drift = None, [], [], []
    for t in sched.timesteps:
        plan = sched.plan_step(x, t, generator=g, condition_mask=condition)
        exact = runner.logits(x, plan)
        before = state.refreshes
        cached = runner.cached_logits(x, plan, state)
        if any(plan.counts):
            opened.append(previous is None or not torch.equal(plan.window_index, previous))
            refreshed.append(state.refreshes > before)
            drift.append(float((cached - exact).abs().max()))
            previous = plan.window_index
        x = sched.step(exact, t, x, generator=g, condition_mask=condition, plan=plan).prev_sample
    assert refreshed == opened and state.refreshes == 3  # 3 blocks of 4: one refresh each, when it opens
    assert max(d for d, o in zip(drift, opened) if o) < 1e-5  # a cache of the current tokens: exact
    assert max(d for d, o in zip(drift, opened) if not o) > 1e-3  # a stale cache: the approximation shows


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "shifted"])
def test_dual_cache_runs_one_forward_per_step_that_reads_logits(shift):
    """The forward that builds the cache when a block opens gives that step's logits: no extra forward per block.
    Every step that reads logits commits at least one position, so those steps are counted from the masks left."""
    pipe = _pipe(shift)
    pipe.scheduler = _blocks(pipe, "confidence")
    mask = pipe.tokenizer.mask_token_id
    kw = dict(gen_length=12, num_inference_steps=24, output_type="pt", guidance_scale=1.5)
    exact = pipe(PROMPTS, **kw)
    for refresh in (None, 2, 1):
        left = []

        def count(p, i, t, callback_kwargs, left=left):
            left.append(int((callback_kwargs["sample"] == mask).sum()))
            return {}

        out = pipe(PROMPTS, kv_cache="dual", kv_cache_refresh_steps=refresh, callback_on_step_end=count,
                   callback_on_step_end_tensor_inputs=["sample"], **kw)  # fmt: skip
        reading = sum(a > b for a, b in zip([12 * len(PROMPTS)] + left, left))
        assert out.nfe == reading == exact.nfe == 12  # 24 steps, each block of 4 done in 4 of its 8
        if refresh == 1:
            assert torch.equal(out.sequences, exact.sequences)


def test_shifted_model_with_guidance_and_padding():
    pipe = _pipe(shift=True)
    pipe.scheduler = _blocks(pipe, "confidence")
    kw = dict(gen_length=8, num_inference_steps=8, output_type="pt", guidance_scale=1.5)
    exact = pipe(PROMPTS, **kw)
    for mode in ("prefix", "dual"):
        assert torch.equal(pipe(PROMPTS, kv_cache=mode, kv_cache_refresh_steps=1, **kw).sequences, exact.sequences)


def test_a_callback_cannot_change_the_settings_of_the_call_under_way():
    """Guidance scale and scheduler are frozen for the call: a callback that changes them between steps leaves the
    guided batch layout under the cache, the sampler and so the tokens as they were."""
    pipe = _pipe()
    pipe.scheduler = _blocks(pipe, "confidence")
    kw = dict(gen_length=12, num_inference_steps=12, output_type="pt", guidance_scale=2.0, kv_cache="dual")
    plain = pipe(PROMPTS, generator=gens(), **kw)
    assert pipe.guidance_scale == 2.0
    flow = _blocks(pipe, "flow")

    def meddle(p, i, t, callback_kwargs):
        p._guidance_scale = 1.0 if i % 2 else 5.0  # 1.0 would halve the batch of the guided forward
        p.scheduler = flow
        return {}

    meddled = pipe(PROMPTS, generator=gens(), callback_on_step_end=meddle, **kw)
    assert torch.equal(meddled.sequences, plain.sequences) and meddled.nfe == plain.nfe
    assert pipe.scheduler is flow  # the change holds from the next call on, which then samples otherwise:
    assert not torch.equal(pipe(PROMPTS, generator=gens(), **kw).sequences, plain.sequences)


@pytest.mark.slow  # torch.compile: ~35 s on 2 cores
def test_cache_with_a_compiled_model():
    pipe = _pipe()
    pipe.scheduler = _blocks(pipe, "confidence")
    kw = dict(gen_length=8, num_inference_steps=8, output_type="pt")
    exact = pipe(PROMPTS[:2], kv_cache="dual", kv_cache_refresh_steps=1, **kw)
    torch._dynamo.reset()
    pipe.model = torch.compile(pipe.model, backend="aot_eager", dynamic=True)
    compiled = pipe(PROMPTS[:2], kv_cache="dual", kv_cache_refresh_steps=1, **kw)
    assert torch.equal(compiled.sequences, exact.sequences)


def test_bad_combinations_are_refused_clearly():
    pipe = _pipe()
    with pytest.raises(ValueError, match="block_length"):
        pipe("x", gen_length=4, num_inference_steps=2, kv_cache="dual")  # the default scheduler has no blocks
    pipe.scheduler = _blocks(pipe, "confidence")
    with pytest.raises(ValueError, match="kv_cache"):
        pipe("x", gen_length=4, num_inference_steps=2, kv_cache="suffix")
    with pytest.raises(ValueError, match="kv_cache_refresh_steps"):
        pipe("x", gen_length=4, num_inference_steps=2, kv_cache="dual", kv_cache_refresh_steps=0)
    with pytest.raises(ValueError, match="kv_cache_refresh_steps"):
        pipe("x", gen_length=4, num_inference_steps=2, kv_cache_refresh_steps=2)
