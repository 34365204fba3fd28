"""lm-evaluation-harness adapter (`DFMLM`), its shipped offline tasks and `dfm-hf lm-eval`.

A tiny model is trained here (seconds) on "key = value" pairs until it knows every pair with a margin, so that a
task can be built that it must know; the ELBO estimators are checked against an exhaustive computation of the exact
ELBO (every masked subset enumerated). Tests that use that model or run lm-eval end to end are `slow`.
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
from dfm_hf.evaluation.elbo import time_of_ratio, windows  # noqa: E402
from dfm_hf.evaluation.harness import DFMLM, TASKS_PATH, task_manager  # noqa: E402
from dfm_hf.evaluation.harness_args import coerce, generation_settings  # noqa: E402
from dfm_hf.evaluation.harness_cli import cli_main  # noqa: E402
from dfm_hf.evaluation.lm_eval_tasks.utils import build_next_line_examples, process_humaneval  # noqa: E402
from dfm_hf.evaluation.tasks import HUMANEVAL_STOP_SEQUENCES, load_humaneval, row_seed  # noqa: E402
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
#: The trained model must prefer every value token by this many nats (log-probability over the runner-up).
MARGIN = 1.0
MAX_STEPS = 3000


class Request:
    """What lm-eval hands a model: an object with ``args``."""

    def __init__(self, *args):
        self.args = args


@torch.no_grad()
def pair_margin(model, tok) -> float:
    """Smallest margin (nats), over every key and every token of its value, by which the model's log-probability of
    the right token beats the best other token, with the whole value masked after ``key =`` (DFMLM's greedy check)."""
    worst = math.inf
    for k, v in zip(KEYS, VALUES):
        ctx = tok(f"{k} =", add_special_tokens=False)["input_ids"]
        cont = torch.tensor(tok(f" {v}", add_special_tokens=False)["input_ids"])
        x = torch.tensor([ctx + [tok.mask_token_id] * len(cont)])
        log_probs = torch.log_softmax(model(input_ids=x).logits[0, len(ctx) :].double(), -1)
        right = log_probs.gather(1, cont[:, None]).squeeze(1)
        log_probs[torch.arange(len(cont)), cont] = -math.inf
        worst = min(worst, float((right - log_probs.max(-1).values).min()))
    return worst


def _train_key_value_pipeline() -> DFMPipeline:
    """A tiny DFM trained on rows of three ``key = value`` pairs separated by EOS until it knows every pair: its
    :func:`pair_margin` is at least ``MARGIN`` (checked every 50 steps from step 200; where floating point takes the
    training on this CPU does not matter)."""
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
    margin = -math.inf
    for step in range(1, MAX_STEPS + 1):
        model.train()
        batch = collator([row() for _ in range(32)])
        keys = ("input_ids", "timesteps", "attention_mask", "labels")
        loss = model(**{k: batch[k] for k in keys}).loss  # the cross-entropy on the scored positions
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 200 and step % 50 == 0:
            model.eval()
            margin = pair_margin(model, tok)
            if margin >= MARGIN:
                break
    model.eval()
    assert margin >= MARGIN, f"the key-value model did not learn the pairs in {MAX_STEPS} steps (margin {margin})"
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
    Full logits (no logits_to_keep): an independent path from the harness's. ``L`` reads ``p_{1|t}`` without the
    mask token (the softmax over the other tokens)."""
    n, m = len(continuation), len(context)
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    rows = torch.tensor([context + continuation] * len(subsets))
    for r, s in enumerate(subsets):
        rows[r, [m + i for i in s]] = mask_id
    logits = model(input_ids=rows).logits.double()
    logits[..., mask_id] = -math.inf  # p_{1|t} as the samplers draw from it: never the mask token
    log_probs = torch.log_softmax(logits, -1)
    target = torch.tensor(continuation)
    mean = second = 0.0
    for r, s in enumerate(subsets):
        loss = -float(log_probs[r, [m + i for i in s], target[list(s)]].sum())
        k = len(s)
        mean += loss / (k * math.comb(n, k))
        second += (n / k * loss) ** 2 / (n * math.comb(n, k))
    return mean, second - mean**2


# ---------------------------------------------------------------------------------------------- the ELBO
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    t = time_of_ratio(ratio, lm._kappa)
    assert torch.allclose(lm._kappa.kappa(t), 1 - ratio, atol=1e-9)
    ((ll, _),) = lm.loglikelihood([Request("def f(x):", " return x")], disable_tqdm=True)
    assert math.isfinite(ll) and ll < 0
    with pytest.raises(ValueError, match="time_conditioning=True: use estimator='ratio'"):
        DFMLM(pretrained=pipe, estimator="count")


def test_likelihood_and_greedy_check_exclude_the_mask_token():
    """``p_{1|t}`` as every sampler draws from it, the mask token excluded: with a head whose mask logit is the largest
    everywhere, the continuation's token is still the greedy choice, and its NLL is that of the softmax over the other
    tokens (one token: the "count" estimator is exact whatever ``mc_num``)."""
    pipe = tiny_pipeline()
    model, mask = pipe.model, pipe.mask_token_id
    (gold,) = pipe.tokenizer(" return", add_special_tokens=False)["input_ids"]
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[gold], head.bias[mask] = 20.0, 40.0
    model.set_output_embeddings(head)
    lm = DFMLM(pretrained=pipe, mc_num=4)
    ((ll, greedy),) = lm.loglikelihood([Request("def f(x):", " return")], disable_tqdm=True)
    context, _ = lm._encode_pair("def f(x):", " return")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + [mask]])).logits[0, -1].double()
    assert int(logits.argmax()) == mask
    without = torch.log_softmax(logits.index_fill(0, torch.tensor([mask]), -math.inf), -1)[gold]
    assert greedy and ll == pytest.approx(float(without), abs=1e-4)
    assert float(without - torch.log_softmax(logits, -1)[gold]) > 10  # what counting the mask token would give
    draws = lm.elbo_draws(context, [gold])
    assert torch.allclose(draws, -without, atol=1e-4)


def test_windows_score_every_token_once_within_max_length():
    ids = list(range(30))
    cut = windows(ids, 3, 8)
    assert [tok for w, start in cut for tok in w[start:]] == ids[3:]
    assert all(len(w) <= 8 for w, _ in cut) and cut[0] == (ids[:8], 3)
    # each later window is full and conditioned on at least the half window (4 tokens) before what it scores
    assert all(len(w) == 8 and start == 4 for w, start in cut[1:-1]) and cut[-1] == (ids[22:], 6)
    assert windows(ids[:5], 2, 8) == [(ids[:5], 2)]  # a text that fits: one window with all of its context


def test_draw_masks_follow_their_estimator():
    from dfm_hf.evaluation.elbo import draw_masks

    masked, weight, ratio = draw_masks(6, 500, "count", torch.Generator().manual_seed(0))
    counts = masked.sum(1)
    assert bool((counts >= 1).all()) and bool((counts <= 6).all())
    assert torch.equal(weight, 6 / counts.double()) and torch.equal(ratio, counts.double() / 6)
    assert set(counts.tolist()) == set(range(1, 7))  # l ~ U{1..n}
    masked, weight, ratio = draw_masks(6, 500, "ratio", torch.Generator().manual_seed(0))
    assert bool((ratio > 0).all()) and bool((ratio <= 1).all()) and torch.equal(weight, 1 / ratio)
    assert abs(float(masked.double().mean()) - float(ratio.mean())) < 0.05  # each token masked with probability t
    with pytest.raises(ValueError, match=r"`estimator` must be one of \['count', 'ratio'\], got 'exact'"):
        draw_masks(6, 4, "exact", torch.Generator())


# ---------------------------------------------------------------------------------------------- generation
def _uncut(lm, context: str, index: int, gen_length: int) -> list[int]:
    """The ids the pipeline generates for request ``index`` alone (its own generator, as generate_until seeds it)."""
    assert lm.tokenizer.bos_token_id is None  # the context is the text's ids alone
    out = lm.pipe(
        input_ids=[lm.tok_encode(context)],
        gen_length=gen_length,
        num_inference_steps=lm.num_inference_steps,
        generator=[torch.Generator().manual_seed(row_seed(lm.seed, "generate_until", index, 0))],
        output_type="pt",
        return_full_text=False,
    )
    return out.sequences[0, :gen_length].tolist()


@pytest.mark.slow
def test_generate_until_cuts_at_stop_sequences_and_eos(trained):
    """Each text is what the pipeline generated for that request, cut exactly at its first EOS and at the first of
    the task's stop strings, whatever the model writes; batching does not change it; max_gen_toks caps the canvas."""
    tok = trained.tokenizer
    settings = dict(pretrained=trained, scheduler_preset="confidence", num_inference_steps=10, gen_length=10)
    lm = DFMLM(batch_size=1, **settings)
    contexts = [f"{k} =" for k in KEYS]
    raw = [_uncut(lm, c, i, 10) for i, c in enumerate(contexts)]
    # cut at the first EOS (the trained model writes "value<eos>key = ..."): the text before it
    eos = tok.eos_token_id
    assert any(eos in r[:-1] for r in raw), [tok.decode(r) for r in raw]
    expected = [tok.decode(r[: r.index(eos)] if eos in r else r, skip_special_tokens=True) for r in raw]
    assert any(expected), expected
    uncut = lm.generate_until([Request(c, {"until": [], "max_gen_toks": 10}) for c in contexts], disable_tqdm=True)
    assert uncut == expected
    # the same requests in one batch, and in batches of 3: request i draws from its own generator
    assert DFMLM(**settings).generate_until([Request(c, {"until": []}) for c in contexts], True) == uncut
    assert DFMLM(batch_size=3, **settings).generate_until([Request(c, {"until": []}) for c in contexts], True) == uncut
    # the first of several stop strings, wherever they fall
    cut = lm.generate_until([Request(c, {"until": ["l", "ct", "\n"], "max_gen_toks": 10}) for c in contexts], True)
    assert cut == [u.split("l")[0].split("ct")[0].split("\n")[0] for u in uncut]
    # a stop string taken from the second half of each text: every text is cut, at its first occurrence
    stops = [u[len(u) // 2 :] or "never written" for u in uncut]
    reqs = [Request(c, {"until": [stop, "never written"], "max_gen_toks": 10}) for c, stop in zip(contexts, stops)]
    cut = lm.generate_until(reqs, disable_tqdm=True)
    assert cut == [u[: u.index(stop)] if u else "" for u, stop in zip(uncut, stops)]
    assert all(len(c) < len(u) for c, u in zip(cut, uncut) if u)
    # max_gen_toks caps gen_length: a canvas of two tokens
    (short,) = lm.generate_until([Request("alpha =", {"until": [], "max_gen_toks": 2})], disable_tqdm=True)
    two = _uncut(lm, "alpha =", 0, 2)
    assert short == tok.decode(two[: two.index(eos)] if eos in two else two, skip_special_tokens=True)
    assert len(tok(short, add_special_tokens=False)["input_ids"]) <= 2


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


def test_coerce_converts_command_line_strings():
    from typing import Optional

    assert coerce("mc_num", " 8 ", int) == 8 and coerce("mc_num", 8.0, int) == 8
    assert coerce("temperature", "0.5", Optional[float]) == 0.5
    assert coerce("block_length", "None", Optional[int]) is None
    assert coerce("flag", "yes", bool) is True and coerce("flag", "0", bool) is False
    for value, hint, message in [
        ("2.5", int, "`x` must be an integer, got '2.5'"),
        (2.5, int, "`x` must be an integer, got 2.5"),
        (True, int, "`x` must be an integer, got True"),
        ("nan", float, "`x` must be a finite number, got 'nan'"),
        ("maybe", bool, "`x` must be true or false, got 'maybe'"),
        ("abc", Optional[int], "`x` must be None or an integer, got 'abc'"),
        (None, int, "`x` must not be None"),
    ]:
        with pytest.raises(ValueError) as err:
            coerce("x", value, hint)
        assert str(err.value).startswith(message), str(err.value)


def test_generation_settings_read_the_task_gen_kwargs():
    warned = []

    def settings(gen_kwargs, **kwargs):
        kwargs = {"gen_length": 10, "max_length": 48, "temperature": None, "guidance_scale": 1.0, **kwargs}
        return generation_settings(gen_kwargs, warn=lambda key, message: warned.append(message), **kwargs)

    out = settings({"until": "\n\n", "max_gen_toks": "4", "do_sample": False, "top_k": "5", "seed": 1})
    assert out == {"until": ["\n\n"], "gen_length": 4, "call": {"temperature": 0.0, "top_k": 5}}
    assert len(warned) == 1 and "generate_until ignores gen_kwargs ['seed']" in warned[0]
    # the model's own temperature wins over the task's; guidance is passed when it is not 1
    out = settings({"until": ["", "x"], "temperature": 0.7}, temperature=0.2, guidance_scale=2.0)
    assert out == {"until": ["x"], "gen_length": 10, "call": {"temperature": 0.2, "guidance_scale": 2.0}}
    assert settings({"temperature": "0.7", "max_new_tokens": 20})["call"] == {"temperature": 0.7}
    for gen_kwargs, kwargs, message in [
        ([], {}, "generate_until gen_kwargs must be a dict, got list"),
        ({"until": [1]}, {}, "gen_kwargs `until` must be a string or a list of strings, got [1]"),
        ({"max_gen_toks": 0}, {}, "gen_kwargs `max_gen_toks` must be >= 1, got 0"),
        ({}, {"max_length": 10}, "`gen_length` (10) leaves no room for a prompt in max_length=10 positions"),
    ]:
        with pytest.raises(ValueError) as err:
            settings(gen_kwargs, **kwargs)
        assert str(err.value).startswith(message), str(err.value)


# ---------------------------------------------------------------------------------------------- tasks
@pytest.mark.slow
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


@pytest.mark.slow
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
@pytest.mark.slow
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


def test_lm_eval_cli_rejects_the_options_it_sets(tmp_path, capsys):
    assert dfm_main(["lm-eval", "--model", "hf", "--tasks", "x"]) == 2
    assert (
        "dfm-hf lm-eval: error: `--model` is set by dfm-hf lm-eval (dfm_hf); pass the pipeline as --model_args "
        "pretrained=..." in capsys.readouterr().err
    )
    assert dfm_main(["lm-eval", "--include_path", str(tmp_path), "--tasks", "x"]) == 2
    assert (
        f"dfm-hf lm-eval: error: `--include_path` is set by dfm-hf lm-eval to the shipped tasks ({TASKS_PATH})"
        in capsys.readouterr().err
    )
    # without a default model (the evaluation layer alone), `pretrained` is required and named
    with pytest.raises(ValueError, match=r"`--model_args pretrained=PATH_OR_HUB_ID` is required"):
        cli_main(["--tasks", "stdlib_next_line"])


@pytest.mark.slow
def test_importing_dfm_hf_does_not_import_lm_eval():
    code = "import sys, dfm_hf, dfm_hf.evaluation, dfm_hf.cli; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
