"""Portable sampling: `sampling_dtype` governs every draw of a step, the float32 fallback where a device has no float64,
the grouped arg-max only on the CPU, and the chunked uniform-source and confidence steps (same samples, bounded
memory)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from dfm_hf import paths
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler
from dfm_hf.schedulers.sampling import (
    grouped_max_and_argmax,
    max_and_argmax,
    plain_max_and_argmax,
    resolve_sampling_dtype,
)

MASK, VOCAB = 3, 50


class _Dtypes(TorchFunctionMode):
    """Records the dtype of every floating tensor a torch function returns (or creates) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.seen.add(value.dtype)
        return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(sched, packed: bool = False, per_row: bool = False, steps: int = 5, batch: int = 3, length: int = 10):
    """Sample with random logits (a fixed stream), conditioning the first 2 positions; every step's state."""
    sched.set_timesteps(steps)
    logits_gen = _gen(0)
    gens = [_gen(10 + b) for b in range(batch)] if per_row else _gen(10)
    if sched.config.source_distribution == "mask":
        x = torch.full((batch, length), MASK)
    else:
        x = torch.randint(0, VOCAB, (batch, length), generator=_gen(1))
    cond = torch.zeros(batch, length, dtype=torch.bool)
    cond[:, :2] = True
    x[:, :2] = 7
    states = []
    for t in sched.timesteps:
        plan = sched.plan_step(x, t, generator=gens, condition_mask=cond)
        logits = torch.randn(batch, length, VOCAB, generator=logits_gen) * 3
        x = sched.step(logits[plan.positions] if packed else logits, t, x, generator=gens, plan=plan).prev_sample
        states.append(x)
    return torch.stack(states)


SCHEDULERS = {
    "uniform": lambda dtype: DiscreteFlowScheduler(
        source_distribution="uniform", mask_token_id=MASK, vocab_size=VOCAB, corrector_alpha=3.0, sampling_dtype=dtype
    ),
    "uniform-top-k": lambda dtype: DiscreteFlowScheduler(
        source_distribution="uniform", vocab_size=VOCAB, temperature=0.8, top_k=10, sampling_dtype=dtype
    ),
    "mask-blocks": lambda dtype: DiscreteFlowScheduler(
        mask_token_id=MASK, vocab_size=VOCAB, block_length=4, corrector_alpha=1.0, sampling_dtype=dtype
    ),
    "mask-top-p": lambda dtype: DiscreteFlowScheduler(
        mask_token_id=MASK, vocab_size=VOCAB, temperature=0.7, top_p=0.9, sampling_dtype=dtype
    ),
    "entropy": lambda dtype: ConfidenceUnmaskingScheduler(
        mask_token_id=MASK,
        vocab_size=VOCAB,
        confidence="entropy",
        temperature=0.8,
        block_length=4,
        sampling_dtype=dtype,
    ),
    "margin-greedy": lambda dtype: ConfidenceUnmaskingScheduler(
        mask_token_id=MASK, vocab_size=VOCAB, confidence="margin", sampling_dtype=dtype
    ),
    "random": lambda dtype: ConfidenceUnmaskingScheduler(
        mask_token_id=MASK, vocab_size=VOCAB, remasking="random", temperature=0.5, sampling_dtype=dtype
    ),
    "processed-top-p": lambda dtype: ConfidenceUnmaskingScheduler(
        mask_token_id=MASK,
        vocab_size=VOCAB,
        temperature=0.4,
        top_p=0.9,
        rank_on_processed=True,
        alg_temp=0.5,
        sampling_dtype=dtype,
    ),
}


# ---------------------------------------------------------------------------------------------- sampling_dtype
def test_resolve_sampling_dtype_falls_back_to_float32_only_without_float64():
    assert resolve_sampling_dtype(torch.float64, "cpu") == torch.float64
    assert resolve_sampling_dtype(torch.float64, torch.device("cuda", 0)) == torch.float64
    assert resolve_sampling_dtype(torch.float64, "mps") == torch.float32
    assert resolve_sampling_dtype(torch.float64, torch.device("mps")) == torch.float32
    assert resolve_sampling_dtype(torch.float32, "mps") == torch.float32
    assert resolve_sampling_dtype(torch.float32, "cpu") == torch.float32


def test_the_float32_fallback_warns_once_per_scheduler():
    for make in (DiscreteFlowScheduler, ConfidenceUnmaskingScheduler):
        sched = make(mask_token_id=MASK, vocab_size=VOCAB)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert sched._step_dtype("mps") == torch.float32
            assert sched._step_dtype(torch.device("mps")) == torch.float32
            assert sched._step_dtype("cpu") == torch.float64
        assert len(caught) == 1 and "float32" in str(caught[0].message) and "mps" in str(caught[0].message)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make(mask_token_id=MASK, vocab_size=VOCAB)._step_dtype("mps")  # another instance says it again
            make(mask_token_id=MASK, vocab_size=VOCAB, sampling_dtype="float32")._step_dtype("mps")  # nothing to say
        assert len(caught) == 1


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_float32_sampling_makes_no_float64_tensor(name):
    """Every draw, probability and plan of a step (and `add_noise`) stays in float32: what a device without float64
    runs."""
    sched = SCHEDULERS[name]("float32")
    with _Dtypes() as mode:
        states = _run(sched, packed=True, per_row=True)
        sched.add_noise(states[-1], torch.full_like(states[-1], MASK), torch.tensor([0.2, 0.5, 0.9]), _gen(3))
    assert mode.seen and torch.float64 not in mode.seen, mode.seen
    reference = SCHEDULERS[name]("float64")
    with _Dtypes() as mode:
        _run(reference, packed=True, per_row=True)
    assert torch.float64 in mode.seen  # the check above can fail


def test_plans_and_add_noise_draw_in_sampling_dtype():
    x = torch.full((2, 8), MASK)
    for dtype in (torch.float32, torch.float64):
        sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=VOCAB, sampling_dtype=str(dtype)[6:])
        sched.set_timesteps(4)
        plan = sched.plan_step(x, sched.timesteps[1], generator=_gen(5))
        u = torch.rand((16, 1), generator=_gen(5), dtype=dtype)[:, 0].view(2, 8)
        p = 1.0 - (1.0 - torch.tensor(0.5, dtype=dtype)) / (1.0 - torch.tensor(0.25, dtype=dtype))
        assert torch.equal(plan.forward, u < p)
        x1 = torch.arange(16).view(2, 8)
        noisy = sched.add_noise(x1, x, 0.3, generator=_gen(6))
        u = torch.rand((2, 8), generator=_gen(6), dtype=dtype)
        assert torch.equal(noisy, torch.where(u < paths.PolynomialKappa().kappa(0.3, dtype=dtype), x1, x))


# ---------------------------------------------------------------------------------------------- arg-max
def _argmax_cases():
    g = _gen(0)
    for width in (1, 2, 127, 128, 129, 300):
        x = torch.randint(0, 4, (6, width), generator=g).float()  # many ties
        x[1] = -math.inf
        if width > 3:
            x[2, width // 2] = math.nan
            x[3, 0] = math.nan
            x[4, width - 1] = math.inf
        for skip in {None, 0, width // 2, width - 1}:
            yield x, skip
            yield x.double(), skip


def test_grouped_and_plain_arg_max_agree_and_the_device_type_picks_one():
    for x, skip in _argmax_cases():
        grouped, plain = grouped_max_and_argmax(x, skip), plain_max_and_argmax(x, skip)
        torch.testing.assert_close(grouped[0], plain[0], rtol=0, atol=0, equal_nan=True)
        number = ~plain[0].isnan()  # the index of a NaN row is unspecified (a greedy step refuses such rows)
        assert torch.equal(grouped[1][number], plain[1][number]), (x, skip)
        reference = x.clone()
        if skip is not None:
            reference[:, skip] = -math.inf
        if x.shape[1] > 1 or skip is None:
            torch.testing.assert_close(plain[0], reference.max(-1).values, rtol=0, atol=0, equal_nan=True)
            finite = reference.max(-1).values > -math.inf  # (an all -inf row: the skipped column ties, never wins)
            assert torch.equal(plain[1][finite], reference.max(-1).indices[finite])

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    for device, grouped in (("cpu", True), ("meta", False)):
        with Calls() as calls:
            value, index = max_and_argmax(torch.zeros(4, 300, device=device), skip=7)
        assert value.shape == index.shape == (4,) and value.device.type == device
        assert ("amax" in calls.names) == grouped and ("max" in calls.names) != grouped, calls.names


# ---------------------------------------------------------------------------------------------- chunks
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_chunked_steps_give_the_unchunked_samples(name):
    for packed in (False, True):
        for per_row in (False, True):
            whole = _run(SCHEDULERS[name]("float64"), packed, per_row)
            sched = SCHEDULERS[name]("float64")
            sched.chunk_bytes = 1  # one row per chunk
            assert torch.equal(_run(sched, packed, per_row), whole)
            sched = SCHEDULERS[name]("float64")
            sched.chunk_bytes = 3 * VOCAB * 8  # three rows per chunk: chunks end mid batch row
            assert torch.equal(_run(sched, packed, per_row), whole)


def _peak_bytes(fn, tmp_path) -> int:
    """Peak of the bytes the CPU allocator holds for tensors made while ``fn`` runs (torch's profiler records every
    allocation and free with the running total)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    assert totals, "the profiler recorded no allocation"
    return max(totals)


def test_uniform_source_and_confidence_steps_stay_within_chunks_at_a_32k_vocabulary(tmp_path):
    """2048 positions x 32768 logits (float32, 256 MB): a step's extra memory stays well below one (K, vocab) float64
    tensor (512 MB), which the unchunked steps built several of."""
    positions, vocab = 2048, 32768
    logits = torch.randn(1, positions, vocab, generator=_gen(0))
    full = positions * vocab * 8
    steps = {
        "uniform": (
            DiscreteFlowScheduler(source_distribution="uniform", mask_token_id=0, vocab_size=vocab),
            torch.randint(1, vocab, (1, positions), generator=_gen(1)),
        ),
        "confidence": (
            ConfidenceUnmaskingScheduler(mask_token_id=0, vocab_size=vocab, temperature=0.7, confidence="entropy"),
            torch.zeros(1, positions, dtype=torch.long),
        ),
    }
    for name, (sched, x) in steps.items():
        sched.set_timesteps(1)  # the last step: every position reads its row
        out = []

        def step(sched=sched, x=x, out=out) -> None:
            out.append(sched.step(logits, sched.timesteps[0], x, generator=_gen(2)).prev_sample)

        peak = _peak_bytes(step, tmp_path)
        assert peak < 0.5 * full, (name, peak / 2**20)
        assert peak > sched.chunk_bytes  # the measure sees the chunks
        assert (out[0] != x).float().mean() > 0.9  # the step ran and moved (almost) every position
