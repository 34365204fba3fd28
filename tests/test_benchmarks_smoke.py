"""Smoke tests of ``benchmarks/*.py`` and of ``torch.compile`` on the pipeline's model.

Each benchmark script runs once with ``--quick --threads 1`` in its own subprocess (all at once, ``slow``) and must
exit 0 and print well-formed ``what | ours | theirs | ratio | target | verdict`` lines whose verdict follows from
their ratio and target. Lines whose quantity is deterministic (a count of model calls, an equality of samples) must
PASS; timing and memory lines must only carry a ratio and a verdict: timings on a shared machine are noisy, and the
quick sizes are not the targets' sizes.

``torch.compile(pipe.model)`` must give the same samples as the eager model. By default the check compiles with the
``aot_eager`` backend (Dynamo capture and AOT tracing, a few seconds); the ``inductor`` backend (C++ code generation,
about a minute or more on a small CPU) runs only with ``DFM_TEST_COMPILE_INDUCTOR=1``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
#: script -> minimum number of result lines it prints with --quick
SCRIPTS = {
    "scheduler_step.py": 5,
    "caching.py": 6,
    "logits_to_keep.py": 3,
    "vs_llada2.py": 2,
    "memory.py": 2,
    "fast_sampling.py": 20,
    "block_diffusion.py": 30,
    "quantized_loading.py": 8,
}
TIMEOUT_S = 600
#: script -> (start of a result line's ``what``, how many such lines): deterministic quantities, which must PASS
MUST_PASS = {
    "caching.py": [("nfe / steps, ", 2), ("fraction of tokens equal to skip_idle_steps=False, ", 2)],
    "logits_to_keep.py": [("fraction of tokens equal, use_logits_to_keep=True vs False", 1)],
    "block_diffusion.py": [
        (f"{model} K={k}: max |logit difference| of the last block read against the cache", 1)
        for model in ("small", "random")
        for k in (4, 8)
    ],
}
#: script -> (start of an ``INFO`` line's ``what``, how many such lines): agreements, a fraction in [0, 1]
AGREEMENTS = {"fast_sampling.py": [("small: greedy token agreement ", 3), ("random: greedy token agreement ", 3)]}


def _load_common() -> ModuleType:
    """``benchmarks/common.py`` as module ``benchmarks_common`` (registered first: its dataclasses need that)."""
    if "benchmarks_common" in sys.modules:
        return sys.modules["benchmarks_common"]
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_common"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    """Start every script at once (they are mostly interpreter start-up and imports), then collect them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCHMARKS / name), "--quick", "--threads", "1"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in SCRIPTS
    }
    done = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_prints_well_formed_lines(runs: dict[str, subprocess.CompletedProcess], script: str) -> None:
    common = _load_common()
    run = runs[script]
    assert run.returncode == 0, f"{script} exited {run.returncode}:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    lines = run.stdout.splitlines()
    assert lines and lines[0].startswith("# "), f"{script} printed no header:\n{run.stdout[-2000:]}"
    assert any(line.startswith("# machine: ") for line in lines)
    results = [r for r in (common.parse_line(line) for line in lines) if r is not None]  # raises on a bad line
    assert len(results) >= SCRIPTS[script], f"{script} printed {len(results)} result lines:\n{run.stdout}"
    for r in results:
        assert r.verdict in ("PASS", "FAIL", "INFO")
        if r.verdict != "INFO":
            assert r.ratio is not None and r.ratio == r.ratio and r.ratio >= 0  # a number, not NaN
            op, bound = r.target.split()
            if abs(r.ratio - float(bound)) > 1e-3 * abs(float(bound)):  # the printed ratio has 4 digits
                assert r.verdict == common.verdict(r.ratio, op, float(bound)), r
    for start, count in MUST_PASS.get(script, []):
        lines = [r for r in results if r.what.startswith(start)]
        assert len(lines) == count and all(r.verdict == "PASS" for r in lines), f"{script}: {lines}"
    for start, count in AGREEMENTS.get(script, []):
        lines = [r for r in results if r.what.startswith(start)]
        assert len(lines) == count and all(0 <= r.ratio <= 1 for r in lines), f"{script}: {lines}"


def test_parse_line_rejects_malformed_lines() -> None:
    common = _load_common()
    assert common.parse_line("# a comment") is None
    ok = common.parse_line("step time | 1 ms | 2 s | 0.0005 | <= 0.02 | PASS")
    assert ok.ratio == 0.0005 and ok.target == "<= 0.02"
    for bad in ("a | b | c", "a | b | c | x | <= 1 | PASS", "a | b | c | 1 | <= 1 | MAYBE", "a | b | c | 1 | 1 | PASS"):
        with pytest.raises(ValueError):
            common.parse_line(bad)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_model_gives_the_same_samples(backend: str) -> None:
    if backend == "inductor" and os.environ.get("DFM_TEST_COMPILE_INDUCTOR") != "1":
        pytest.skip("inductor compilation takes minutes on a small CPU; set DFM_TEST_COMPILE_INDUCTOR=1 to run it")
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch")
    pipe = tiny_pipeline()
    kwargs = dict(gen_length=10, num_inference_steps=6, output_type="pt")
    eager = pipe("def f(x):", generator=torch.Generator().manual_seed(0), **kwargs)
    pipe.model = torch.compile(pipe.model, backend=backend)
    assert pipe.config["model"][1] == "DFMForMaskedGeneration"  # the compiled wrapper is recorded as the model
    try:
        compiled = pipe("def f(x):", generator=torch.Generator().manual_seed(0), **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as err:  # e.g. no working C++ compiler for inductor
        pytest.skip(f"torch.compile backend {backend!r} is unavailable here: {err}")
    assert torch.equal(compiled.sequences, eager.sequences)
    assert compiled.nfe == eager.nfe
    again = pipe("def f(x):", generator=torch.Generator().manual_seed(0), **kwargs)  # compiled graphs are reused
    assert torch.equal(again.sequences, eager.sequences)
