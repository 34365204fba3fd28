"""Evaluation tasks and the `dfm-hf evaluate` sweep (tiny random pipelines; real HumanEval data and sandbox)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from dfm_hf import metrics
from dfm_hf.data.corpus import split_by_file, stdlib_python_files
from dfm_hf.evaluation import cli as evaluate_cli
from dfm_hf.evaluation.tasks import (
    build_humaneval,
    build_humaneval_infill,
    build_stdlib_infill,
    decode_generated,
    humaneval_program,
    load_humaneval,
    truncate_completion,
)

try:
    from .helpers import tiny_pipeline, tiny_tokenizer
except ImportError:
    from helpers import tiny_pipeline, tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE_PY = os.path.join(REPO, "examples", "evaluate.py")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


def test_humaneval_canonical_solutions_pass(problems, tokenizer):
    """The program assembly used for generated completions passes with the canonical solutions."""
    chosen = problems[:5]
    candidates, tests = [], []
    for p in chosen:
        candidate, test = humaneval_program(p, truncate_completion(p["canonical_solution"]))
        candidates.append([candidate])
        tests.append(test)
    scores, _ = metrics.load("pass_at_k").compute(predictions=candidates, references=tests, k=[1])
    assert scores == {"pass@1": 1.0}
    # and a wrong body fails through the same path
    wrong = [[humaneval_program(p, "    return None\n")[0]] for p in chosen[:2]]
    scores, _ = metrics.load("pass_at_k").compute(predictions=wrong, references=tests[:2], k=[1])
    assert scores == {"pass@1": 0.0}

    examples = build_humaneval(tokenizer, gen_length=16, context_tokens=64, problems=chosen)
    mask = tokenizer.mask_token_id
    for ex in examples:
        assert len(ex.input_ids) <= 64 and ex.input_ids[-16:] == [mask] * 16 and mask not in ex.input_ids[:-16]
    assert any(ex.meta["truncated"] for ex in examples)  # the prompts are longer than 48 tokens
    oracle = build_humaneval(tokenizer, oracle_length=True, context_tokens=512, problems=chosen)
    for ex, p in zip(oracle, chosen):
        n = len(tokenizer(p["canonical_solution"], add_special_tokens=False)["input_ids"])
        assert ex.num_generated == n == ex.input_ids.count(mask)


def test_humaneval_infill_reconstructs_and_passes(problems, tokenizer):
    examples = build_humaneval_infill(tokenizer, context_tokens=96, seed=3, max_examples=4, problems=problems[:6])
    assert len(examples) == 4
    mask = tokenizer.mask_token_id
    for ex in examples:
        p = next(p for p in problems if p["task_id"] == ex.example_id)
        assert ex.prefix + ex.reference + ex.suffix == p["prompt"] + p["canonical_solution"]
        assert "\n" not in ex.reference.strip() and ex.reference.strip()
        assert ex.input_ids.count(mask) == ex.num_generated and len(ex.input_ids) <= 96
    scores = metrics.load("infilling_exact_match").compute(
        predictions=[ex.reference for ex in examples],
        references=[ex.reference for ex in examples],
        references_tests=[ex.test for ex in examples],
        prefixes=[ex.prefix for ex in examples],
        suffixes=[ex.suffix for ex in examples],
    )
    assert scores == {"exact_match": 1.0, "pass_rate": 1.0}
    two = build_humaneval_infill(tokenizer, num_lines=2, seed=3, max_examples=2, problems=problems[:6])
    assert all(ex.reference.strip().count("\n") == 1 for ex in two)


def test_stdlib_infill_uses_held_out_files_and_reconstructs(tokenizer):
    train_files, val_files = split_by_file(stdlib_python_files(), 0.05)
    examples = build_stdlib_infill(tokenizer, context_tokens=128, seed=0, max_examples=25)
    assert len(examples) == 25
    assert {ex.meta["path"] for ex in examples} <= set(val_files)
    assert not {ex.meta["path"] for ex in examples} & set(train_files)
    mask = tokenizer.mask_token_id
    for ex in examples:
        with open(ex.meta["path"], encoding="utf-8") as f:
            lines = f.read().split("\n")
        function = ex.prefix + ex.reference + ex.suffix
        first = ex.meta["function_first_line"] - 1
        assert function == "\n".join(lines[first : first + function.count("\n")]) + "\n"
        original = lines[ex.meta["line"] - 1]
        assert ex.reference.strip() == original.strip() and original.endswith(ex.reference)
        assert ex.input_ids.count(mask) == ex.num_generated and len(ex.input_ids) <= 128
        # filling the masks with the original tokens gives back the original text of the window
        ids = tokenizer(function, add_special_tokens=False)["input_ids"]
        n_prefix = len(tokenizer(ex.prefix, add_special_tokens=False)["input_ids"])
        span = ids[n_prefix : n_prefix + ex.num_generated]
        assert decode_generated(tokenizer, span, "infill") == ex.reference
    again = build_stdlib_infill(tokenizer, context_tokens=128, seed=0, max_examples=25)
    assert [(e.example_id, e.input_ids) for e in again] == [(e.example_id, e.input_ids) for e in examples]
    other = build_stdlib_infill(tokenizer, context_tokens=128, seed=1, max_examples=25)
    assert [e.example_id for e in other] != [e.example_id for e in examples]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny random DFM pipeline and a tiny random GPT-2 (judge and AR model) with the same tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("eval-models")
    pipe = tiny_pipeline(seed=0)
    pipe.save_pretrained(root / "dfm")
    tok = pipe.tokenizer
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2)
    gpt = GPT2LMHeadModel(config)
    gpt.save_pretrained(root / "gpt")
    tok.save_pretrained(root / "gpt")
    return str(root / "dfm"), str(root / "gpt")


def _sweep_args(model: str, judge: str, out: str) -> list[str]:
    return [
        "--model", model, "--tasks", "genppl", "stdlib_infill", "humaneval_infill", "--nfe", "4", "8",
        "--presets", "linear-euler", "cubic-corrector", "--max_examples", "3", "--genppl_samples", "4",
        "--genppl_length", "16", "--context_tokens", "96", "--batch_size", "4", "--judge", judge,
        "--seed", "1", "--output_dir", out, "--num_threads", "1",
    ]  # fmt: skip


def _rows(out: str) -> list[dict[str, str]]:
    with open(os.path.join(out, "results.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _samples(out: str) -> dict[str, str]:
    folder = os.path.join(out, "samples")
    return {name: open(os.path.join(folder, name), encoding="utf-8").read() for name in sorted(os.listdir(folder))}


def test_sweep_writes_files_resumes_and_matches_two_processes(saved_models, tmp_path):
    dfm_path, gpt_path = saved_models
    out = str(tmp_path / "one")
    threads = torch.get_num_threads()
    try:
        assert evaluate_cli.main(_sweep_args(dfm_path, gpt_path, out)) == 0
        rows = _rows(out)
        assert len(rows) == 12 and {r["num_processes"] for r in rows} == {"1"}
        assert {(r["task"], r["preset"], r["nfe"]) for r in rows} == {
            (t, p, n)
            for t in ("genppl", "stdlib_infill", "humaneval_infill")
            for p in ("linear-euler", "cubic-corrector")
            for n in ("4", "8")
        }
        for r in rows:
            assert r["quality"] != "" and float(r["seconds_per_sample"]) > 0
            if r["task"] == "genppl":
                assert float(r["gen_ppl"]) > 1 and float(r["entropy"]) > 0
        for name in ("results.md", "quality_vs_nfe.png", "entropy_vs_nfe.png", "seconds_per_sample_vs_nfe.png"):
            assert os.path.getsize(os.path.join(out, name)) > 0
        with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
            md = f.read()
        assert "## stdlib_infill: exact_match vs NFE" in md and "| linear-euler |" in md
        with open(os.path.join(out, "quality_vs_nfe.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        csv_before, samples_before = open(os.path.join(out, "results.csv")).read(), _samples(out)

        # resume: nothing is recomputed
        assert evaluate_cli.main(_sweep_args(dfm_path, gpt_path, out)) == 0
        with open(os.path.join(out, "run_log.jsonl"), encoding="utf-8") as f:
            log = [json.loads(line) for line in f]
        assert len(log) == 2 and len(log[0]["computed"]) == 12
        assert log[1]["computed"] == [] and len(log[1]["skipped"]) == 12
        assert open(os.path.join(out, "results.csv")).read() == csv_before

        # a run with other result-affecting settings refuses to mix into these results
        with pytest.raises(ValueError, match="seed"):
            evaluate_cli.main(_sweep_args(dfm_path, gpt_path, out)[:-4] + ["--seed", "2"] + ["--output_dir", out])
    finally:
        torch.set_num_threads(threads)

    # two real processes (torchrun, gloo on CPU): each generates a shard, the main process gathers and writes
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # the running interpreter's, not whatever is on PATH
    out2 = str(tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [*torchrun, "--standalone", "--nproc_per_node", "2", EVALUATE_PY, *_sweep_args(dfm_path, gpt_path, out2)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 process(es))" in proc.stderr
    rows2 = _rows(out2)
    assert {r["num_processes"] for r in rows2} == {"2"}
    keep = ("task", "preset", "nfe", "quality", "exact_match", "pass_rate", "gen_ppl", "entropy", "num_rows")
    assert [{k: r[k] for k in keep} for r in rows2] == [{k: r[k] for k in keep} for r in rows]
    assert _samples(out2) == samples_before


def test_sweep_with_causal_lm_baseline(saved_models, tmp_path):
    """A causal LM folder is evaluated left to right (one cell per task, nfe 0 = one call per token)."""
    _, gpt_path = saved_models
    out = str(tmp_path / "ar")
    args = ["--model", gpt_path, "--tasks", "genppl", "stdlib_infill", "--max_examples", "3", "--genppl_samples", "3",
            "--genppl_length", "12", "--context_tokens", "96", "--output_dir", out, "--num_threads", "1"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert evaluate_cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    rows = _rows(out)
    assert [(r["task"], r["preset"], r["nfe"]) for r in rows] == [("genppl", "ar-sample", "0"), ("stdlib_infill",
                                                                   "ar-sample", "0")]  # fmt: skip
    assert float(rows[0]["nfe_actual"]) == 12.0
    with pytest.raises(ValueError, match="presets"):
        evaluate_cli.main(args + ["--presets", "linear-euler"])


def test_cli_rejects_bad_input(saved_models, tmp_path):
    from dfm_hf.cli import main as dfm_main

    dfm_path, _ = saved_models
    assert dfm_main(["evaluate", "--model", dfm_path, "--nfe", "0", "--output_dir", str(tmp_path)]) == 2
    assert dfm_main(["evaluate", "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path)]) == 2
    proc = subprocess.run([sys.executable, EVALUATE_PY, "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "--presets" in proc.stdout
