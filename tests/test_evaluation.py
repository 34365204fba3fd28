"""Evaluation tasks and the `dfm-hf evaluate` sweep (tiny random pipelines; real HumanEval data and sandbox)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from dfm_hf.data.corpus import split_by_file, stdlib_python_files
from dfm_hf.evaluation import cli as evaluate_cli
from dfm_hf.evaluation import metrics
from dfm_hf.evaluation.generators import ARGenerator, load_generator
from dfm_hf.evaluation.results import COLUMNS, read_results, results_markdown, write_all
from dfm_hf.evaluation.scoring import score_cell
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_one_cell_sweep_and_its_files(saved_models, tmp_path):
    """The smallest sweep (one task, preset and NFE; no plots) writes its row, samples and table; a second run
    computes nothing."""
    dfm_path, _ = saved_models
    out = str(tmp_path / "cell")
    args = ["--model", dfm_path, "--tasks", "genppl", "--nfe", "2", "--presets", "linear-euler", "--genppl_samples",
            "2", "--genppl_length", "8", "--output_dir", out, "--no_plots", "--num_threads", "1"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert evaluate_cli.main(args) == 0
        assert evaluate_cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = read_results(os.path.join(out, "results.csv"))
    assert list(row) == list(COLUMNS)
    assert (row["task"], row["preset"], row["nfe"], row["num_rows"], row["judge"]) == ("genppl", "linear-euler", "2",
                                                                                        "2", "none")  # fmt: skip
    assert row["gen_ppl"] == "" and float(row["entropy"]) > 0 and row["quality_metric"] == "gen_ppl"
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["genppl__linear-euler__nfe2.jsonl"]
    assert not any(name.endswith(".png") for name in os.listdir(out))
    with open(os.path.join(out, "run_log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    assert [len(r["computed"]) for r in log] == [1, 0] and log[1]["skipped"] == [["genppl", "linear-euler", 2]]


def test_results_files_round_trip_and_table(tmp_path):
    rows = [
        {"task": "stdlib_infill", "preset": "b", "nfe": 8, "exact_match": 0.25, "quality": 0.25, "seed": 0},
        {"task": "stdlib_infill", "preset": "a", "nfe": 16, "exact_match": 0.5, "quality": 0.5, "seed": 0},
        {"task": "genppl", "preset": "a", "nfe": 8, "gen_ppl": float("nan"), "entropy": 3.25, "seed": 0},
    ]
    write_all(str(tmp_path), rows, plots=False)
    back = read_results(str(tmp_path / "results.csv"))
    assert [(r["task"], r["preset"], r["nfe"]) for r in back] == [("genppl", "a", "8"), ("stdlib_infill", "a", "16"),
                                                                  ("stdlib_infill", "b", "8")]  # fmt: skip
    assert back[0]["gen_ppl"] == "" and back[0]["entropy"] == "3.25" and back[1]["exact_match"] == "0.5"
    md = results_markdown(rows)
    assert md == (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "## stdlib_infill: exact_match vs NFE\n\n| preset | NFE 8 | NFE 16 |" in md
    assert "| a |  | 0.500 |" in md and "| b | 0.250 |  |" in md and "| a | nan / 3.25 |" in md
    assert read_results(str(tmp_path / "missing.csv")) == []


def test_score_cell_on_tiny_inputs(tokenizer):
    from dfm_hf.evaluation.tasks import EvalExample

    examples = [EvalExample(example_id=str(i), kind="infill", input_ids=[], reference=r) for i, r in
                enumerate(["    return x\n", "    y = 1\n"])]  # fmt: skip
    scores = score_cell("stdlib_infill", examples, [["return x"], ["  y  =  2"]], pass_k=[1], num_samples=1,
                        timeout=5.0, judge=None, tokenizer=tokenizer)  # fmt: skip
    assert scores["exact_match"] == 0.5 and scores["quality"] == 0.5 and scores["quality_metric"] == "exact_match"
    texts = [["aaaa"], [""], ["abab"]]
    scores = score_cell("genppl", examples[:1] * 3, texts, pass_k=[1], num_samples=1, timeout=5.0, judge=None,
                        tokenizer=tokenizer)  # fmt: skip
    import numpy as np

    def entropy(text):  # of the empirical distribution of the text's token ids
        _, counts = np.unique(tokenizer(text, add_special_tokens=False)["input_ids"], return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log(p)).sum())

    assert scores["entropy"] == pytest.approx((entropy("aaaa") + entropy("abab")) / 2)  # the empty text is left out
    assert np.isnan(scores["gen_ppl"]) and np.isnan(scores["quality"])


def test_causal_lm_generator_is_seeded_and_greedy(saved_models):
    _, gpt_path = saved_models
    generator = load_generator(gpt_path, "cpu")
    assert isinstance(generator, ARGenerator) and generator.presets == ["ar-sample", "ar-greedy"]
    mask = generator.mask_token_id
    rows = [[5, 6, mask, mask, mask], [mask, mask]]
    sampled, calls = generator.generate(rows, [1, 2], nfe=0)
    assert [len(r) for r in sampled] == [3, 2] and calls == 2.5  # one call per generated token
    assert generator.generate(rows, [1, 2], nfe=0)[0] == sampled  # the seeds fix the draws
    generator.set_preset("ar-greedy")
    greedy, _ = generator.generate(rows[:1], [1], nfe=0)
    assert greedy == generator.generate(rows[:1], [9], nfe=0)[0]  # greedy ignores the seed
    with pytest.raises(ValueError, match=r"a causal LM takes the presets \['ar-sample', 'ar-greedy'\], got 'x'"):
        generator.set_preset("x")


def test_cli_rejects_bad_input(saved_models, tmp_path, capsys):
    from dfm_hf.cli import main as dfm_main

    dfm_path, _ = saved_models
    assert dfm_main(["evaluate", "--model", dfm_path, "--nfe", "0", "--output_dir", str(tmp_path)]) == 2
    assert "dfm-hf evaluate: error: `--nfe` values must be >= 1, got [0]" in capsys.readouterr().err
    missing = str(tmp_path / "nope")
    assert dfm_main(["evaluate", "--model", missing, "--output_dir", str(tmp_path)]) == 2
    assert f"dfm-hf evaluate: error: `--model` {missing!r} could not be loaded as a DFM pipeline" in (
        capsys.readouterr().err
    )
    # the evaluation layer alone has no default model: --model is required there
    with pytest.raises(ValueError, match=r"`--model` is required: a DFM pipeline folder or Hub id, or a causal LM"):
        evaluate_cli.main(["--output_dir", str(tmp_path)])


def test_example_script_help():
    proc = subprocess.run([sys.executable, EVALUATE_PY, "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "--presets" in proc.stdout and "usage: dfm-hf evaluate" in proc.stdout
