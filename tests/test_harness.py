"""lm-evaluation-harness adapter (`DFMLM`), its shipped offline tasks and `dfm-hf lm-eval`.

A tiny model is trained here (seconds) on "key = value" pairs, so that a task can be built that it must know; the
ELBO estimators are checked against an exhaustive computation of the exact ELBO (every masked subset enumerated).
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

try:
    import lm_eval
except ImportError as err:  # never a silent skip: the extra is part of the test install
    raise ImportError("tests/test_harness.py needs lm-eval: pip install -e '.[dev]' (extra `eval`)") from err

from dfm_hf.cli import main as dfm_main  # noqa: E402
from dfm_hf.evaluation.harness import DFMLM, TASKS_PATH, task_manager  # noqa: E402
from dfm_hf.evaluation.lm_eval_tasks.utils import build_next_line_examples, process_humaneval  # noqa: E402
from dfm_hf.evaluation.tasks import HUMANEVAL_STOP_SEQUENCES, load_humaneval  # noqa: E402
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration  # noqa: E402
from dfm_hf.pipelines import DFMPipeline  # noqa: E402
from dfm_hf.schedulers import DiscreteFlowScheduler  # noqa: E402
from dfm_hf.training import DFMDataCollator  # noqa: E402

try:
    from .helpers import tiny_pipeline, tiny_tokenizer
except ImportError:
    from helpers import tiny_pipeline, tiny_tokenizer

KEYS = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"]
VALUES = ["tuple", "list", "dict", "set", "bytes", "float", "int", "str"]


class Request:
    """What lm-eval hands a model: an object with ``args``."""

    def __init__(self, *args):
        self.args = args


def _train_key_value_pipeline() -> DFMPipeline:
    """A tiny DFM trained (400 steps) on rows of three ``key = value`` pairs separated by EOS."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = DFMConfig.from_preset("tiny", tokenizer=tok, max_position_embeddings=48)
    model = DFMForMaskedGeneration(config)
    scheduler = DiscreteFlowScheduler(mask_token_id=tok.mask_token_id, vocab_size=config.vocab_size)
    pairs = [tok(f"{k} = {v}", add_special_tokens=False)["input_ids"] for k, v in zip(KEYS, VALUES)]
    rng = random.Random(0)

    def row():
        out = []
        for j in range(3):
            out += pairs[rng.randrange(len(pairs))] + ([tok.eos_token_id] if j < 2 else [])
        return out

    collator = DFMDataCollator(
        scheduler=scheduler,
        coupling={"unconditional": 0.3, "prefix": 0.7},
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        batch = collator([row() for _ in range(32)])
        batch.pop("kappa_rate")
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    pipe = DFMPipeline(model=model, scheduler=scheduler, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def trained():
    return _train_key_value_pipeline()


@pytest.fixture(scope="module")
def tasks():
    return task_manager(include_defaults=False)


def _ids(pipe, text):
    return pipe.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def exact_nelbo(model, context, continuation, mask_id):
    """Exact negative ELBO, and the variance of one draw of the "count" estimator, by enumerating every subset.

    NELBO = sum_S L(S) / (|S| C(n, |S|)); a "count" draw is (n / |S|) L(S) with probability 1 / (n C(n, |S|)).
    Full logits (no logits_to_keep): an independent path from the harness's.
    """
    n, m = len(continuation), len(context)
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    rows = torch.tensor([context + continuation] * len(subsets))
    for r, s in enumerate(subsets):
        rows[r, [m + i for i in s]] = mask_id
    log_probs = torch.log_softmax(model(input_ids=rows).logits.double(), -1)
    target = torch.tensor(continuation)
    mean = second = 0.0
    for r, s in enumerate(subsets):
        loss = -float(log_probs[r, [m + i for i in s], target[list(s)]].sum())
        k = len(s)
        mean += loss / (k * math.comb(n, k))
        second += (n / k * loss) ** 2 / (n * math.comb(n, k))
    return mean, second - mean**2


# ---------------------------------------------------------------------------------------------- the ELBO
@pytest.mark.parametrize("estimator", ["count", "ratio"])
def test_elbo_estimators_are_unbiased_for_the_exact_elbo(trained, estimator):
    """Both estimators' means land within a few standard errors of the enumerated ELBO (2 to 6 tokens; known and
    unknown continuations).

    Safety margins, from simulating the same checks with the enumerated values over 2000 seeds: count's mean is
    within 4 exact standard errors (CLT: fails ~1e-4), ratio's within 6 empirical ones (largest seen: 4.8).
    """
    cases = [("beta =", " dict"), ("kappa", " = bytes"), ("alpha", " = dict"), ("gamma = d", "ict")]
    for context, continuation in cases:
        ctx, cont = _ids(trained, context), _ids(trained, continuation)
        assert 1 <= len(cont) <= 6
        exact, variance = exact_nelbo(trained.model, ctx, cont, trained.mask_token_id)
        lm = DFMLM(pretrained=trained, mc_num=4000, batch_size=500, estimator=estimator)
        draws = lm.elbo_draws(ctx, cont, generator=torch.Generator().manual_seed(1))
        assert draws.shape == (4000,) and bool((draws >= 0).all())
        # count: the exact standard error; ratio (infinite variance in theory): the empirical one, more room
        se = math.sqrt(variance / 4000) if estimator == "count" else float(draws.std()) / math.sqrt(4000)
        assert abs(float(draws.mean()) - exact) < (4 if estimator == "count" else 6) * se + 1e-9, (context, exact)
        if estimator == "count":
            assert abs(float(draws.var()) - variance) < 0.25 * variance + 1e-9


def test_standard_error_shrinks_like_one_over_sqrt_mc_num(trained):
    """Over 400 seeds, the estimate's spread at mc_num=16 is twice that at 64, and matches sigma / sqrt(mc_num).

    Simulated with the enumerated values: the ratio's sd is ~0.1 (bounds at 4.5 sd), the relative deviation's ~0.04.
    """
    ctx, cont = _ids(trained, "beta ="), _ids(trained, " dict")
    _, variance = exact_nelbo(trained.model, ctx, cont, trained.mask_token_id)
    spread = {}
    for mc in (16, 64):
        lm = DFMLM(pretrained=trained, mc_num=mc, batch_size=512)
        means = torch.stack(
            [lm.elbo_draws(ctx, cont, generator=torch.Generator().manual_seed(s)).mean() for s in range(400)]
        )
        spread[mc] = float(means.std())
        assert abs(spread[mc] / math.sqrt(variance / mc) - 1) < 0.25
    assert 1.55 < spread[16] / spread[64] < 2.55


def test_loglikelihood_does_not_depend_on_batching_or_other_requests(trained):
    reqs = [Request("beta =", " dict"), Request("alpha =", " tuple"), Request("", " set")]
    small = DFMLM(pretrained=trained, mc_num=32, batch_size=7, seed=3).loglikelihood(reqs, disable_tqdm=True)
    large = DFMLM(pretrained=trained, mc_num=32, batch_size=512, seed=3).loglikelihood(reqs, disable_tqdm=True)
    alone = DFMLM(pretrained=trained, mc_num=32, batch_size=512, seed=3).loglikelihood(reqs[1:2], disable_tqdm=True)
    for a, b in zip(small, large):
        assert a[1] == b[1] and a[0] == pytest.approx(b[0], abs=1e-5)
    assert alone[0][0] == pytest.approx(large[1][0], abs=1e-5)
    assert large[1][1] is True and large[0][1] is False  # "alpha = tuple" is what the model greedily fills
    other = DFMLM(pretrained=trained, mc_num=32, seed=4).loglikelihood(reqs[:1], disable_tqdm=True)
    assert other[0][0] != large[0][0]  # another seed, other draws


def test_loglikelihood_rolling_sums_window_elbos(trained):
    """A 12-token text with max_length=8 is cut into windows that score every token once; the estimate matches
    the sum of the windows' exact ELBOs."""
    lm = DFMLM(pretrained=trained, mc_num=3000, batch_size=500, max_length=8)
    text = "alpha = tuple beta = list"
    ids = [trained.tokenizer.eos_token_id] + _ids(trained, text)
    assert len(ids) > 8
    windows = lm.windows(ids, 1)
    assert len(windows) > 1 and all(len(w) <= 8 for w, _ in windows)
    scored = [tok for w, s in windows for tok in w[s:]]
    assert scored == ids[1:]
    exact = variance = 0.0
    for w, s in windows:
        e, v = exact_nelbo(trained.model, w[:s], w[s:], trained.mask_token_id)
        exact, variance = exact + e, variance + v
    (value,) = lm.loglikelihood_rolling([Request(text)], disable_tqdm=True)
    assert abs(-value - exact) < 4 * math.sqrt(variance / 3000)
    # a text that fits is one window conditioned on the prefix token (EOS here: the tokenizer has no BOS)
    short = DFMLM(pretrained=trained, mc_num=3000, batch_size=500)
    cont = _ids(trained, " tuple")
    e, v = exact_nelbo(trained.model, [trained.tokenizer.eos_token_id], cont, trained.mask_token_id)
    (value,) = short.loglikelihood_rolling([Request(" tuple")], disable_tqdm=True)
    assert abs(-value - e) < 4 * math.sqrt(v / 3000)


def test_time_conditioned_models_use_the_ratio_estimator():
    pipe = tiny_pipeline(time_conditioning=True)
    lm = DFMLM(pretrained=pipe, mc_num=8)
    assert lm.estimator == "ratio"
    ratio = torch.tensor([0.05, 0.5, 1.0], dtype=torch.float64)
    t = lm._time_of_ratio(ratio)
    assert torch.allclose(lm._kappa.kappa(t), 1 - ratio, atol=1e-9)
    ((ll, _),) = lm.loglikelihood([Request("def f(x):", " return x")], disable_tqdm=True)
    assert math.isfinite(ll) and ll < 0
    with pytest.raises(ValueError, match="time_conditioning=True: use estimator='ratio'"):
        DFMLM(pretrained=pipe, estimator="count")


# ---------------------------------------------------------------------------------------------- generation
def test_generate_until_cuts_at_stop_sequences_and_eos(trained):
    lm = DFMLM(pretrained=trained, scheduler_preset="confidence", num_inference_steps=10, gen_length=10)
    reqs = [Request(f"{k} =", {"until": ["\n"], "max_gen_toks": 10}) for k in KEYS]
    # the model writes "value<eos>key = ...": the text stops at EOS
    assert lm.generate_until(reqs, disable_tqdm=True) == [f" {v}" for v in VALUES]
    cut = lm.generate_until([Request(f"{k} =", {"until": ["l", "ct"], "max_gen_toks": 10}) for k in KEYS], True)
    assert cut == [f" {v}".split("l")[0].split("ct")[0] for v in VALUES]
    assert cut[0] == " tup" and cut[2] == " di"
    # the same requests in batches of 3: request i draws from its own generator
    batched = DFMLM(pretrained=trained, scheduler_preset="confidence", num_inference_steps=10, gen_length=10)
    batched.batch_size = 3
    assert batched.generate_until(reqs, disable_tqdm=True) == [f" {v}" for v in VALUES]
    # max_gen_toks caps gen_length: two tokens cannot hold " tuple"
    (short,) = lm.generate_until([Request("alpha =", {"until": [], "max_gen_toks": 2})], disable_tqdm=True)
    assert len(trained.tokenizer(short, add_special_tokens=False)["input_ids"]) <= 2 and " tuple".startswith(short)


def test_sampled_generation_is_seeded_per_request():
    pipe = tiny_pipeline()
    reqs = [Request("def f(x):", {"until": [], "do_sample": True, "temperature": 1.0}) for _ in range(4)]
    one = DFMLM(pretrained=pipe, gen_length=12, num_inference_steps=6, batch_size=1).generate_until(reqs, True)
    four = DFMLM(pretrained=pipe, gen_length=12, num_inference_steps=6, batch_size=4).generate_until(reqs, True)
    assert one == four and len(set(one)) > 1  # same texts whatever the batching; requests differ from each other


def test_chat_template():
    pipe = tiny_pipeline()
    lm = DFMLM(pretrained=pipe)
    with pytest.raises(ValueError, match="no chat template"):
        lm.chat_template(True)
    assert lm.chat_template(False) is None
    pipe.tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    lm = DFMLM(pretrained=pipe)
    assert lm.chat_template(True) == pipe.tokenizer.chat_template
    text = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<user>hi\n"
    assert isinstance(lm.tokenizer_name, str)


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mc_nun": 8}, r"unknown DFMLM argument\(s\) \['mc_nun'\]; accepted: .*'mc_num'"),
        ({"mc_num": 0}, "`mc_num` must be an integer >= 1"),
        ({"mc_num": "many"}, "`mc_num` must be an integer, got 'many'"),
        ({"batch_size": "auto"}, "`batch_size` must be an integer"),
        ({"estimator": "exact"}, r"`estimator` must be one of \['count', 'ratio'\]"),
        ({"dtype": "int8"}, r"`dtype` must be None, 'auto' or one of \['float32', 'float16', 'bfloat16'\]"),
        ({"scheduler_preset": "fast"}, r"`scheduler_preset` must be one of this pipeline's presets \["),
        ({"block_length": 0}, "`block_length` must be None or an integer >= 1"),
        ({"temperature": -1}, "`temperature` must be None or >= 0"),
        ({"max_length": 10_000}, "`max_length` must be <= the model's max_position_embeddings"),
        ({"pretrained": None}, "`pretrained` is required"),
        ({"pretrained": "/no/such/folder"}, "could not be loaded as a DFM pipeline"),
    ],
)
def test_bad_model_args_are_clear_errors(kwargs, message):
    args = {"pretrained": tiny_pipeline(), **kwargs}
    with pytest.raises(ValueError, match=message):
        DFMLM(**args)


def test_block_length_and_guidance_scale_are_checked_against_the_pipeline():
    import inspect

    pipe = tiny_pipeline()
    if "block_length" in inspect.signature(DiscreteFlowScheduler.__init__).parameters:
        assert DFMLM(pretrained=pipe, block_length=4).pipe.scheduler.config.block_length == 4
    else:
        with pytest.raises(ValueError, match="DiscreteFlowScheduler has none. Pick a `scheduler_preset`"):
            DFMLM(pretrained=pipe, block_length=4)
    if "guidance_scale" in inspect.signature(DFMPipeline.__call__).parameters:
        lm = DFMLM(pretrained=pipe, guidance_scale=2.0, gen_length=6, num_inference_steps=3)
        (text,) = lm.generate_until([Request("def f(x):", {"until": []})], disable_tqdm=True)
        assert isinstance(text, str) and lm.guidance_scale == 2.0
    else:
        with pytest.raises(ValueError, match="needs a DFMPipeline that accepts guidance_scale"):
            DFMLM(pretrained=pipe, guidance_scale=2.0)
    assert DFMLM(pretrained=pipe, guidance_scale=1.0).guidance_scale == 1.0


def test_string_model_args_are_coerced_and_presets_do_not_touch_the_callers_pipeline():
    pipe = tiny_pipeline()
    lm = DFMLM(
        pretrained=pipe, mc_num="8", temperature="0.5", seed="3", block_length="4", scheduler_preset="confidence"
    )
    assert (lm.mc_num, lm.temperature, lm.seed, lm.block_length) == (8, 0.5, 3, 4)
    assert lm.pipe.scheduler.config.block_length == 4
    assert type(pipe.scheduler).__name__ == "DiscreteFlowScheduler"  # the caller's pipeline keeps its scheduler


# ---------------------------------------------------------------------------------------------- tasks
def test_simple_evaluate_on_the_shipped_tasks(tasks):
    """lm-eval's own entry point runs DFMLM on both shipped tasks (generation + sandboxed scoring, ELBO)."""
    assert {"humaneval_local", "stdlib_next_line"} <= set(tasks.all_subtasks) and "dfm_hf_offline" in tasks.all_tags
    lm = DFMLM(pretrained=tiny_pipeline(), mc_num=2, batch_size=16, gen_length=12, num_inference_steps=3)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["humaneval_local", "stdlib_next_line"],
        task_manager=tasks,
        limit=2,
        confirm_run_unsafe_code=True,
    )
    assert 0.0 <= out["results"]["humaneval_local"]["pass@1,none"] <= 1.0
    assert 0.0 <= out["results"]["stdlib_next_line"]["acc,none"] <= 1.0
    assert out["config"]["dfm_hf"]["mc_num"] == 2


def test_loglikelihood_ranks_what_the_trained_model_knows_first(trained, tmp_path):
    """A local-file multiple-choice task (dataset_path: json) over the trained pairs: accuracy 1."""
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for i, k in enumerate(KEYS):
            f.write(json.dumps({"query": f"{k} =", "choices": VALUES, "gold": i}) + "\n")
    (tmp_path / "pairs.yaml").write_text(
        "task: key_value_pairs\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: query\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n"
    )
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=DFMLM(pretrained=trained, mc_num=16, batch_size=256),
        tasks=["key_value_pairs"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    assert out["results"]["key_value_pairs"]["acc,none"] == 1.0


def test_humaneval_scoring_runs_in_the_sandbox():
    problems = load_humaneval()[:2]
    assert [process_humaneval(p, [p["canonical_solution"]]) for p in problems] == [{"pass@1": 1.0}] * 2
    # a completion past a stop sequence is cut before it runs; two repeats give c / n
    p = problems[0]
    assert process_humaneval(p, [p["canonical_solution"] + "\nprint(1/0)\n", "    return 0\n"]) == {"pass@1": 0.5}


def test_humaneval_yaml_uses_the_stop_sequences_of_dfm_hf_evaluate():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    with open(os.path.join(TASKS_PATH, "humaneval_local.yaml")) as f:
        config = yaml.load(f, Loader=Loader)
    assert tuple(config["generation_kwargs"]["until"]) == HUMANEVAL_STOP_SEQUENCES
    assert config["unsafe_code"] is True and config["process_results"] == "utils.process_humaneval"


def test_next_line_task_is_deterministic_and_well_formed():
    examples = build_next_line_examples(num_examples=60)
    assert examples == build_next_line_examples(num_examples=60)
    assert len(examples) == 60 and len({e["id"] for e in examples}) == 60
    root = os.path.dirname(os.__file__)
    for e in examples:
        rel, line = e["id"].rsplit(":", 1)
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            lines = f.read().split("\n")
        answer = e["choices"][e["gold"]]
        assert lines[int(line) - 1] == answer and e["context"].endswith("\n")
        assert e["context"] == "\n".join(lines[int(line) - 1 - e["context"].count("\n") : int(line) - 1]) + "\n"
        assert len(set(e["choices"])) == 4
        for c in e["choices"]:
            assert c.strip() == answer.strip() or c.strip() not in {x.strip() for x in lines}


# ---------------------------------------------------------------------------------------------- command line
def test_dfm_hf_lm_eval_cli_end_to_end(trained, tmp_path):
    folder = tmp_path / "pipe"
    trained.save_pretrained(str(folder))
    out_dir = tmp_path / "results"
    code = dfm_main(
        [
            "lm-eval",
            "--model_args",
            f"pretrained={folder},mc_num=2,estimator=ratio",
            "--tasks",
            "stdlib_next_line",
            "--limit",
            "3",
            "--output_path",
            str(out_dir),
        ]
    )
    assert code == 0
    (path,) = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    with open(path) as f:
        results = json.load(f)
    assert 0.0 <= results["results"]["stdlib_next_line"]["acc,none"] <= 1.0
    assert results["config"]["dfm_hf"]["estimator"] == "ratio"
    assert results["config"]["batch_size"] in (32, "32")  # dfm-hf lm-eval's default rows per forward
    assert dfm_main(["lm-eval", "--model", "hf", "--tasks", "x"]) == 2
    assert dfm_main(["lm-eval", "--include_path", str(tmp_path), "--tasks", "x"]) == 2


def test_importing_dfm_hf_does_not_import_lm_eval():
    code = "import sys, dfm_hf, dfm_hf.evaluation, dfm_hf.cli; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
