"""examples/compare_default_models.py end to end on tiny models: table, references, caching, argument errors."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

try:
    from .helpers import tiny_pipeline, tiny_tokenizer
except ImportError:
    from helpers import tiny_pipeline, tiny_tokenizer

pytestmark = pytest.mark.slow  # end-to-end runs of the example; the default systems materialise the default model

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "compare_default_models.py"
)


def load_script():
    spec = importlib.util.spec_from_file_location("compare_default_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny DFM pipeline folder and a tiny causal LM folder (the judge and an AR system), same tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("compare")
    tiny_pipeline(seed=0).save_pretrained(str(root / "dfm"))
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=1024,
            eos_token_id=1,
            pad_token_id=0,
            bos_token_id=None,
        )
    )
    lm.save_pretrained(str(root / "lm"))
    tok.save_pretrained(str(root / "lm"))
    return root


def _argv(root, out, *extra):
    return [
        "--output_dir",
        str(out),
        "--judge",
        str(root / "lm"),
        "--humaneval_prompts",
        "2",
        "--gen_length",
        "8",
        "--steps",
        "8",
        "4",
        "--infill_examples",
        "3",
        "--infill_steps",
        "8",
        "--samples",
        "1",
        "--timeout",
        "20",
        "--system",
        f"tiny={root / 'dfm'}",
        "--system",
        "real=real",
        "--system",
        "unigram=unigram",
        "--system",
        f"ar=ar:{root / 'lm'}",
        *extra,
    ]


def test_table_references_and_cache(folders, tmp_path, capsys):
    script = load_script()
    out = tmp_path / "cmp"
    assert script.main(_argv(folders, out, "--presets", "default@1", "confidence")) == 0
    result = json.loads((out / "results.json").read_text())
    rows = {(r["system"], r["sampler"], str(r["steps"])): r for r in result["rows"]}
    # the DFM system: 2 settings x 2 step counts; AR: one row per distinct temperature (1 and greedy)
    assert set(rows) == {
        ("tiny", "default T=1", "8"),
        ("tiny", "default T=1", "4"),
        ("tiny", "confidence", "8"),
        ("tiny", "confidence", "4"),
        ("real", "-", "-"),
        ("unigram", "-", "-"),
        ("ar", "ar T=1", "AR"),
        ("ar", "greedy", "AR"),
    }
    real, noise = rows[("real", "-", "-")], rows[("unigram", "-", "-")]
    assert real["pass@1"] == 1.0 and real["infill_em"] == 1.0  # the canonical solutions pass their own tests
    assert noise["pass@1"] == 0.0 and noise["infill_em"] == 0.0
    assert real["entropy_vs_real"] == pytest.approx(1.0)
    assert rows[("tiny", "default T=1", "8")]["infill_em"] is not None  # infilling shown on the 8-step rows only
    assert rows[("tiny", "default T=1", "4")]["infill_em"] is None
    assert all(r["judge_ppl"] > 1 for r in result["rows"] if r["num_empty"] < 2)
    # speed: a causal LM writes one token per call; the DFM model at most its 8 tokens per call
    assert rows[("ar", "greedy", "AR")]["tokens_per_call"] == 1.0
    assert 0 < rows[("tiny", "default T=1", "4")]["tokens_per_call"] <= 8.0
    assert real["tokens_per_call"] is None and rows[("tiny", "default T=1", "8")]["seconds_per_completion"] > 0
    md = (out / "results.md").read_text()
    assert "| system | sampler | steps | judge ppl |" in md and "### real / - / steps -" in md
    assert "| tokens / call | s / completion |" in md
    assert real["samples"][0][1] in md  # the canonical solution is printed as a sample
    capsys.readouterr()

    # a rerun with one more setting computes only its cells; the others come from the cache, unchanged
    assert script.main(_argv(folders, out, "--presets", "default@1", "confidence", "default@0.5")) == 0
    log = capsys.readouterr().err
    assert "compare: tiny humaneval default T=0.5" in log and "compare: tiny humaneval default T=1" not in log
    assert "compare: real" not in log
    again = {
        (r["system"], r["sampler"], str(r["steps"])): r for r in json.loads((out / "results.json").read_text())["rows"]
    }
    for key, row in rows.items():
        assert again[key]["samples"] == row["samples"] and again[key]["judge_ppl"] == row["judge_ppl"]
    assert ("ar", "ar T=0.5", "AR") in again


def test_bad_arguments_fail_before_loading(folders, tmp_path):
    script = load_script()
    cases = [
        (["--system", "x=/nonexistent"], "not a DFM pipeline folder"),
        (["--system", "a=real", "--system", "a=unigram"], "unique"),
        (["--presets", "default@hot"], "temperature must be a number"),
        (["--steps", "0"], "--steps"),
        (["--judge", "nowhere"], "--judge"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            script.main(["--output_dir", str(tmp_path / "x"), *extra])
    with pytest.raises(ValueError, match="not a preset of"):
        script.main(_argv(folders, tmp_path / "y", "--presets", "no-such-preset"))
