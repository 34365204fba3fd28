"""Block-diffusion sampling in DFMPipeline (a model with ``config.block_size``): the exact key/value cache gives the
tokens of the uncached path and of a plain reference sampler, the step split, EOS stopping, the transfer schedule
and the refusals. Tiny random CPU models."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_tokenizer

from dfm_hf.generation.block_diffusion import block_layout, block_steps
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler
from dfm_hf.schedulers.utils import block_grid_windows

BLOCK = 4
PROMPTS = ["def f(x):", "import os, sys\nclass A:", "x = 1"]  # different lengths: left padding, 2 or 3 blocks


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def block_pipe(shift: bool = False, seed: int = 0, block: int = BLOCK, tokenizer: bool = True, **config) -> DFMPipeline:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = DFMConfig.from_preset("tiny", tokenizer=tok, block_size=block, logits_shift=shift, **config)
    model = DFMForMaskedGeneration(cfg).eval()
    scheduler = ConfidenceUnmaskingScheduler(mask_token_id=tok.mask_token_id, vocab_size=cfg.vocab_size)
    pipe = DFMPipeline(model=model, scheduler=scheduler, tokenizer=tok if tokenizer else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(n: int = len(PROMPTS), seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


SCHEDULERS = {
    "greedy": (ConfidenceUnmaskingScheduler, {}),
    "sampled": (ConfidenceUnmaskingScheduler, dict(temperature=1.0)),
    "threshold": (ConfidenceUnmaskingScheduler, dict(confidence_threshold=0.004)),
    "margin-top-k": (ConfidenceUnmaskingScheduler, dict(temperature=0.8, top_k=20, confidence="margin")),
    "flow": (DiscreteFlowScheduler, {}),
    "corrector": (DiscreteFlowScheduler, dict(kappa_exponent=2.0, corrector_alpha=2.0)),
}


def use(pipe: DFMPipeline, kind: str) -> None:
    cls, kwargs = SCHEDULERS[kind]
    pipe.scheduler = cls(mask_token_id=pipe.mask_token_id, vocab_size=pipe.model.config.vocab_size, **kwargs)


# ------------------------------------------------------------------------------------------------ cached == uncached
@pytest.mark.parametrize("kind", list(SCHEDULERS))
@pytest.mark.parametrize("shift", [False, True])
def test_cached_and_uncached_give_the_same_tokens(kind, shift):
    pipe = block_pipe(shift=shift)
    use(pipe, kind)
    for guidance in (1.0, 2.0):
        kw = dict(gen_length=9, num_inference_steps=7, output_type="pt", guidance_scale=guidance)
        cached = pipe(PROMPTS, generator=gens(), **kw)
        plain = pipe(PROMPTS, generator=gens(), kv_cache=None, **kw)
        assert torch.equal(cached.sequences, plain.sequences), (kind, shift, guidance)
        # one shared generator too (rows read it in turn)
        one = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
        one_plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), kv_cache=None, **kw)
        assert torch.equal(one.sequences, one_plain.sequences)
    # the cache never needs more forwards than recomputing the prefix
    assert cached.nfe <= plain.nfe


@pytest.mark.parametrize("kind", ["sampled", "corrector"])
def test_larger_sampler_blocks_cached_and_uncached(kind):
    """A scheduler block_length that is a multiple of the model's block_size: the pattern follows the sampler."""
    pipe = block_pipe(shift=True)
    use(pipe, kind)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, block_length=2 * BLOCK)
    kw = dict(gen_length=11, num_inference_steps=6, output_type="pt", guidance_scale=1.5)
    cached = pipe(PROMPTS, generator=gens(), **kw)
    assert torch.equal(cached.sequences, pipe(PROMPTS, generator=gens(), kv_cache=None, **kw).sequences)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, block_length=None)
    assert not torch.equal(cached.sequences, pipe(PROMPTS, generator=gens(), **kw).sequences)


def test_the_reference_switches_change_nothing():
    pipe = block_pipe(shift=True)
    use(pipe, "sampled")
    kw = dict(gen_length=9, num_inference_steps=9, output_type="pt", guidance_scale=1.5)
    fast = pipe(PROMPTS, generator=gens(), **kw)
    for cache in ("auto", None):
        slow = pipe(PROMPTS, generator=gens(), kv_cache=cache, skip_idle_steps=False, use_logits_to_keep=False, **kw)
        assert torch.equal(fast.sequences, slow.sequences)


def test_a_batch_row_equals_the_same_row_alone():
    """Left padding shifts a row to the common block column; its blocks, steps and draws stay its own."""
    pipe = block_pipe()
    use(pipe, "flow")
    kw = dict(gen_length=7, num_inference_steps=6, output_type="pt")
    batch = pipe(PROMPTS, generator=gens(), **kw).sequences
    for r, prompt in enumerate(PROMPTS):
        alone = pipe(prompt, generator=gens(1, seed=r), **kw).sequences[0]
        assert torch.equal(batch[r, : alone.numel()], alone)


# ------------------------------------------------------------------------------------------------ reference sampler
def sdar_greedy_reference(model, prompt: list[int], gen_length: int, block: int, steps: int, mask: int, tau=None):
    """The published greedy block-diffusion sampler (SDAR's evaluation sampler), written plainly: full forwards of
    ``[0, end of block)`` under a 4-D block-causal mask, argmax, confidence = probability of the argmax (the mask token
    is never a value), ``block / steps`` commits per step (capped at the masks left): the top ones, or every one above
    ``tau`` when there are at least that many. A ``block`` larger than the model's attends in blocks of ``block``."""
    wider = {} if block == model.config.block_size else {"block_size": block}
    total = math.ceil((len(prompt) + gen_length) / block) * block
    x = torch.tensor([prompt + [mask] * (total - len(prompt))])
    pos = torch.arange(total)
    causal = (pos[None, :] // block <= pos[:, None] // block)[None, None]
    per_step = block // steps
    with torch.no_grad():
        for b in range(len(prompt) // block, total // block):
            lo, hi = b * block, (b + 1) * block
            for _ in range(steps):
                masked = x[0, lo:hi] == mask
                if not masked.any():
                    break
                logits = model(input_ids=x[:, :hi], attention_mask=causal[..., :hi, :hi], **wider).logits[0, lo:hi]
                logits = logits.float()
                logits[:, mask] = -math.inf
                conf, tokens = torch.softmax(logits, -1).max(-1)
                conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
                n = min(per_step, int(masked.sum()))
                chosen = torch.zeros_like(masked)
                chosen[conf.topk(n).indices] = True
                if tau is not None and int((masked & (conf > tau)).sum()) >= n:
                    chosen = masked & (conf > tau)
                x[0, lo:hi] = torch.where(chosen, tokens, x[0, lo:hi])
    return x[0, : len(prompt) + gen_length]


@pytest.mark.parametrize("prompt_length", [8, 6, 3])
@pytest.mark.parametrize("tau", [None, 0.004])
@pytest.mark.parametrize("block", [BLOCK, 2 * BLOCK])
def test_the_pipeline_gives_the_reference_samplers_tokens(prompt_length, tau, block):
    pipe = block_pipe(eos_token_id=None)
    pipe.tokenizer = None  # no EOS: every block runs, as in the reference
    use(pipe, "threshold" if tau else "greedy")
    if block != BLOCK:  # decoding with larger blocks than the model's
        pipe.scheduler = ConfidenceUnmaskingScheduler.from_config(pipe.scheduler.config, block_length=block)
    gen_length, steps = 10, 2  # 2 steps per block: block / 2 tokens a step
    vocab = pipe.model.config.vocab_size
    prompts = torch.randint(3, vocab, (2, prompt_length), generator=torch.Generator().manual_seed(1))
    blocks = math.ceil((prompt_length % block + gen_length) / block)
    for cache in ("auto", None):
        kw = dict(gen_length=gen_length, num_inference_steps=steps * blocks, kv_cache=cache, output_type="pt")
        out = pipe(input_ids=prompts, **kw)
        for r in range(2):
            ref = sdar_greedy_reference(
                pipe.model, prompts[r].tolist(), gen_length, block, steps, pipe.mask_token_id, tau=tau
            )
            assert torch.equal(out.sequences[r], ref)


# ------------------------------------------------------------------------------------------------ steps and nfe
def test_block_layout_and_step_split():
    layout = block_layout([[5] * 5, [5] * 8, [5] * 3], gen_length=6, block_length=4, mask_token_id=2, pad_token_id=0)
    # full prompt blocks: 1, 2, 0 -> every first generated block starts at column 8
    assert layout.start == 8 and layout.num_blocks == [2, 2, 3]
    assert layout.sample.shape == (3, 8 + 3 * 4)
    assert layout.attention[0].tolist() == [0] * 4 + [1] * 12 + [0] * 4
    assert layout.attention[2].tolist() == [0] * 8 + [1] * 12
    assert layout.generated.sum(1).tolist() == [6, 6, 6]
    assert (layout.sample[layout.generated] == 2).all() and not layout.condition[layout.generated].any()
    # N over a row's blocks, earlier blocks one more; at least one step
    assert block_steps([2, 3], 8).tolist() == [[4, 4, 0], [3, 3, 2]]
    assert block_steps([3], 2).tolist() == [[1, 1, 1]]


def test_one_forward_per_step_and_none_per_block():
    """Greedy, one token a step: every step needs the model once, and a block's first step reads the logits of the
    forward that stores the block before it (no extra forward per block)."""
    pipe = block_pipe()
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    for cache in ("auto", None):
        out = pipe(input_ids=ids, gen_length=12, num_inference_steps=12, output_type="pt", kv_cache=cache)
        assert out.nfe == 12
    # 2 steps for a block of 4: 2 tokens a step (fixed schedule); the partial block of 2 masks needs one step
    out = pipe(input_ids=ids[:, :6], gen_length=6, num_inference_steps=4, output_type="pt")
    assert out.nfe == 1 + 2


def test_calls_are_counted_and_stopped_rows_run_no_model():
    pipe = block_pipe(tokenizer=False)
    pipe.model.config.eos_token_id = None
    ids = torch.randint(3, 300, (3, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(gen_length=12, num_inference_steps=12, output_type="pt")
    free = pipe(input_ids=ids, **kw).sequences
    eos = int(free[1, 8 + 4])  # a token row 1 generates in its second block
    pipe.model.config.eos_token_id = eos
    rows = []
    hook = pipe.model.register_forward_pre_hook(lambda m, a, k: rows.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        out = pipe(input_ids=ids, **kw)
    finally:
        hook.remove()
    stops = [min([j for j in range(3) if eos in free[r, 8 + 4 * j : 12 + 4 * j].tolist()] or [2]) for r in range(3)]
    assert stops[1] <= 1
    for r in range(3):
        n = 8 + 4 * (stops[r] + 1)
        assert torch.equal(out.sequences[r, :n], free[r, :n])  # the same tokens up to the stop
        assert (out.sequences[r, n:] == pipe._pad_id()).all()  # nothing after it
    assert rows == [sum(j <= stop for stop in stops) for j in range(3) for _ in range(4)]
    assert out.nfe == 12


def test_a_callback_sees_the_block_layout_and_can_stop_a_row():
    pipe = block_pipe()
    seen = []
    eos = pipe.tokenizer.eos_token_id

    def plant_eos(p, i, t, kw):
        seen.append(kw["sample"].shape)
        sample = kw["sample"].clone()
        if i == 0:
            start = sample.shape[1] - 3 * BLOCK  # the first generated block
            sample[0, start + 3] = eos
        return {"sample": sample}

    ids = torch.randint(3, 300, (2, 4), generator=torch.Generator().manual_seed(0))
    out = pipe(
        input_ids=ids,
        gen_length=12,
        num_inference_steps=12,
        callback_on_step_end=plant_eos,
        callback_on_step_end_tensor_inputs=["sample"],
    )
    assert seen[0] == (2, 16)
    assert (out.sequences[0, 8:] == pipe._pad_id()).all() and (out.sequences[1, 8:] != pipe._pad_id()).all()
    assert eos not in pipe.tokenizer(out.texts[0])["input_ids"]


# ------------------------------------------------------------------------------------------------ scheduler rules
def test_fixed_transfer_schedule_commits_the_block_width_over_its_steps():
    sched = ConfidenceUnmaskingScheduler(mask_token_id=2, vocab_size=10, transfer_schedule="fixed")
    sched.set_timesteps(3)
    x = torch.full((2, 8), 2)
    given = torch.zeros_like(x, dtype=torch.bool)
    given[1, :5] = True  # a block holding the prompt's tail: 3 masks left
    logits = torch.randn(2, 8, 10, generator=torch.Generator().manual_seed(0))
    committed = []
    for i, t in enumerate(sched.timesteps):
        windows = block_grid_windows(~given, torch.tensor([3, 3]), i, 0, 8)
        plan = sched.plan_step(x, t, condition_mask=given, windows=windows)
        new = sched.step(logits, t, x, condition_mask=given, plan=plan).prev_sample
        committed.append(((new != 2) & (x == 2)).sum(1).tolist())
        x = new
    assert committed == [[3, 3], [3, 0], [2, 0]]  # ceil(8 / 3) a step, capped at what is left
    # "even" spreads the masks left over the steps left instead; None picks "fixed" only with caller windows
    even = ConfidenceUnmaskingScheduler(mask_token_id=2, vocab_size=10)
    even.set_timesteps(3)
    x = torch.full((2, 8), 2)
    windows = block_grid_windows(~given, [3, 3], 0, 0, 8)
    plan = even.plan_step(x, even.timesteps[0], condition_mask=given, windows=windows)
    assert plan.commits.tolist() == [3, 3]
    assert even.plan_step(x, even.timesteps[0], condition_mask=given).commits.tolist() == [3, 1]


def test_block_grid_windows_idle_rows_and_local_time():
    free = torch.ones(2, 4, dtype=torch.bool)
    w = block_grid_windows(free, torch.tensor([3, 2]), 2, 5, 4)
    assert w.window.tolist() == [[True] * 4, [False] * 4]
    assert w.num_open.tolist() == [6, 6] and w.width.tolist() == [4, 4]
    flow = DiscreteFlowScheduler(mask_token_id=2, vocab_size=10)
    flow.set_timesteps(3)
    plan = flow.plan_step(torch.full((2, 4), 2), flow.timesteps[2], generator=torch.Generator(), windows=w)
    assert plan.counts == [4, 0]  # row 0's last step resolves every mask; row 1 is idle
    assert plan.timesteps.tolist() == pytest.approx([2 / 3, 0.0])


# ------------------------------------------------------------------------------------------------ refusals
def test_bad_combinations_are_refused_clearly():
    pipe = block_pipe()
    for mode in ("prefix", "dual"):
        with pytest.raises(ValueError, match="block-diffusion model"):
            pipe("x", gen_length=4, num_inference_steps=2, kv_cache=mode)
    with pytest.raises(ValueError, match="kv_cache_refresh_steps"):
        pipe("x", gen_length=4, num_inference_steps=2, kv_cache_refresh_steps=1)
    with pytest.raises(ValueError, match="Infilling"):
        pipe("a " + pipe.tokenizer.mask_token + " b", gen_length=4, num_inference_steps=2)
    pipe.scheduler = ConfidenceUnmaskingScheduler.from_config(pipe.scheduler.config, block_length=6)
    with pytest.raises(ValueError, match=r"block_length`=6.*multiple of the model's `block_size`=4"):
        pipe("x", gen_length=4, num_inference_steps=2)
    pipe.scheduler = DiscreteFlowScheduler(source_distribution="uniform", vocab_size=pipe.model.config.vocab_size)
    with pytest.raises(ValueError, match="source_distribution"):
        pipe("x", gen_length=4, num_inference_steps=2)
    with pytest.raises(ValueError, match="transfer_schedule"):
        ConfidenceUnmaskingScheduler(mask_token_id=2, transfer_schedule="linear")


def test_every_preset_runs_inside_the_block():
    pipe = block_pipe()
    for name in pipe.scheduler_presets:  # confidence-blocks: blocks of 32, a multiple of the model's 4
        pipe.load_scheduler_preset(name)
        out = pipe(PROMPTS, gen_length=6, num_inference_steps=6, generator=gens(), output_type="pt")
        plain = pipe(PROMPTS, gen_length=6, num_inference_steps=6, generator=gens(), output_type="pt", kv_cache=None)
        assert torch.equal(out.sequences, plain.sequences), name
        assert not (out.sequences == pipe.mask_token_id).any(), name
