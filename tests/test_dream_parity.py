"""Dream's samplers: the ``dream-*`` presets of a Dream pipeline against Dream's ``diffusion_generate``, written here
from its published algorithm (a plain loop of full forwards of the converted model), token for token."""

from __future__ import annotations

import math

import pytest
import torch

from dfm_hf import DFMPipeline
from dfm_hf.pipelines.released import family_scheduler_presets
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

MASK = ch.DREAM_MASK
ALGS = {"dream-maskgit-plus": "maskgit_plus", "dream-margin": "topk_margin", "dream-entropy": "entropy"}


def _top_p(rows: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dream's nucleus filter: keep the sorted tokens up to and including the first whose cumulative probability
    exceeds ``top_p``."""
    ordered, order = rows.sort(-1, descending=True)
    drop = ordered.softmax(-1).cumsum(-1) > top_p
    drop[:, 1:] = drop[:, :-1].clone()
    drop[:, 0] = False
    return rows.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), torch.finfo(rows.dtype).min)


def dream_reference(model, prompt: torch.Tensor, gen_length: int, steps: int, alg: str, temperature: float = 0.0,
                    top_p=None, eps: float = 1e-3, generators=None, dtype=torch.float32):  # fmt: skip
    """Dream's ``diffusion_generate`` (``alg`` in maskgit_plus / topk_margin / entropy), from its published algorithm.

    Steps run on ``t = linspace(1, eps, steps + 1)``. At step ``i`` every masked position gets a token from the
    processed distribution ``q = softmax(top_p(logits / temperature))`` (no division at temperature 0, where the token
    is the arg-max) and a confidence computed on ``q``: the token's probability, the top-1 minus top-2 probability, or
    ``sum q log(q + 1e-10)``. With ``m`` the masked positions per row, ``int(m * (1 - t[i+1] / t[i]))`` of them (all
    of them at the last step) keep their token, the most confident first. The model's position ``j`` predicts token
    ``j`` (the converted model applies Dream's logit shift).

    At temperature > 0 the draws are matched to ours: one float64 uniform per masked position from the row's
    generator, row-major, turned into a token by the inverse CDF; a step that commits nothing draws nothing. (Dream
    draws with ``torch.multinomial`` and discards the draws of such a step: the same distribution.)

    Returns the generated tokens and each step's number of committed positions per row.
    """
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), MASK)], 1)
    t = torch.linspace(1, eps, steps + 1)
    counts = []
    for i in range(steps):
        masked = x == MASK
        m = masked.sum() / x.shape[0]
        k = int(m * (1 - t[i + 1] / t[i])) if i < steps - 1 else int(m)
        counts.append(k)
        if k == 0:
            continue
        rows = model(input_ids=x).logits[masked].to(dtype)
        if temperature > 0:
            rows = rows / temperature
        if top_p is not None and top_p < 1:
            rows = _top_p(rows, top_p)
        probs = rows.softmax(-1)
        if temperature > 0:
            per_row = masked.sum(1).tolist()
            u = torch.cat([torch.rand((n, 1), generator=g, dtype=torch.float64) for g, n in zip(generators, per_row)])
            cdf = probs.double().cumsum(-1)
            tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
            conf = probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        else:
            conf, tokens = probs.max(-1)
        if alg == "topk_margin":
            top2 = probs.topk(2, -1).values
            conf = top2[:, 0] - top2[:, 1]
        elif alg == "entropy":
            conf = (probs * (probs + 1e-10).log()).sum(-1)
        full = torch.full(x.shape, -math.inf, dtype=dtype)
        full[masked] = conf
        drawn = torch.full_like(x, MASK)
        drawn[masked] = tokens
        index = full.topk(k, -1).indices
        x.scatter_(1, index, drawn.gather(1, index))
    return x[:, prompt.shape[1] :], counts


@pytest.fixture(scope="module")
def dream_pipe(tmp_path_factory) -> DFMPipeline:
    """A tiny random checkpoint in Dream's format whose head, like a trained Dream's, gives the mask token no weight:
    residual dimension 0 is held at a constant (its rows of ``o_proj`` / ``down_proj`` are zero) and the mask row of
    the head reads only that dimension, negatively. The head is scaled up so that the distributions are peaked."""
    source = ch.qwen2_source()
    with torch.no_grad():
        source.model.embed_tokens.weight[:, 0] = 2.0
        for layer in source.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        source.model.norm.weight[0] = 1.0
        source.lm_head.weight.mul_(5.0)
        source.lm_head.weight[MASK].zero_()
        source.lm_head.weight[MASK, 0] = -200.0
    folder = str(tmp_path_factory.mktemp("dream"))
    ch.write_checkpoint(folder, ch.dream_tensors(source), ch.dream_config())
    ch.save_tokenizer(ch.tiny_tokenizer(), folder, custom_class="DreamTokenizer")
    pipe = DFMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, preset: str, prompt, gen_length: int, steps: int, generators=None, **overrides):
    """Our pipeline with ``preset`` (``overrides`` on its config); the tokens and each step's commits per row."""
    base = pipe.scheduler_presets[preset]
    pipe.scheduler = ConfidenceUnmaskingScheduler.from_config(base.config, **overrides)
    seen = []

    def record(p, i, t, kwargs):
        seen.append(kwargs["sample"][:, prompt.shape[1] :] != MASK)
        return {}

    out = pipe(
        input_ids=prompt,
        gen_length=gen_length,
        num_inference_steps=steps,
        output_type="pt",
        generator=generators,
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["sample"],
    )
    before = torch.zeros_like(seen[0])
    counts = []
    for now in seen:
        counts.append(int((now & ~before).sum(1)[0]))
        before = now
    return out.sequences[:, prompt.shape[1] :], counts


def _prompt(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 380, (rows, 5), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", list(ALGS))
@pytest.mark.parametrize("gen_length, steps", [(16, 16), (16, 5), (12, 7)])
@pytest.mark.parametrize("top_p", [None, 0.95])
def test_greedy_presets_give_dreams_tokens_and_commits(dream_pipe, preset, gen_length, steps, top_p):
    prompt = _prompt(2)
    with torch.no_grad():
        ref, ref_counts = dream_reference(dream_pipe.model, prompt, gen_length, steps, ALGS[preset], top_p=top_p)
    ours, counts = _run(dream_pipe, preset, prompt, gen_length, steps, temperature=0.0, top_p=top_p)
    assert torch.equal(ours, ref)
    assert counts == ref_counts


def test_dream_schedule_commits_nothing_first_and_the_rest_last(dream_pipe):
    """With Dream's defaults and ``steps = gen_length`` its schedule commits 0, 1, ..., 1, 2 (LLaDA's: 1, ..., 1)."""
    _, counts = _run(dream_pipe, "dream-entropy", _prompt(1), 16, 16, temperature=0.0)
    assert counts == [0] + [1] * 14 + [2]
    _, even = _run(dream_pipe, "dream-entropy", _prompt(1), 16, 16, temperature=0.0, transfer_schedule="even")
    assert even == [1] * 16


def test_dream_schedule_runs_inside_each_block(dream_pipe):
    """With ``block_length`` each block's steps follow Dream's rule on their own grid: 4 masks in 4 steps commit
    ``int(4 * 0.24975) = 0``, then 1, 1 and the last 2."""
    _, counts = _run(dream_pipe, "dream-entropy", _prompt(1), 8, 8, temperature=0.0, block_length=4)
    assert counts == [0, 1, 1, 2] * 2


@pytest.mark.parametrize("preset", list(ALGS))
def test_sampled_presets_give_the_references_tokens_under_matched_draws(dream_pipe, preset):
    prompt = _prompt(2, seed=1)
    refs, ours = [], []
    for seed in range(3):
        gens = [torch.Generator().manual_seed(seed * 10 + b) for b in range(2)]
        with torch.no_grad():
            ref, _ = dream_reference(dream_pipe.model, prompt, 12, 6, ALGS[preset], 0.7, top_p=0.95, generators=gens,
                                     dtype=torch.float64)  # fmt: skip
        gens = [torch.Generator().manual_seed(seed * 10 + b) for b in range(2)]
        out, _ = _run(dream_pipe, preset, prompt, 12, 6, generators=gens, temperature=0.7, top_p=0.95)
        refs.append(ref)
        ours.append(out)
    assert all(torch.equal(a, b) for a, b in zip(ours, refs))
    assert len({tuple(r.flatten().tolist()) for r in refs}) > 1  # the draws mattered


def test_ranking_on_the_processed_distribution_changes_the_order(dream_pipe):
    """The option the presets set is the one that matters: ranking on ``p_{1|t}`` itself gives other tokens here."""
    prompt = _prompt(2)
    with torch.no_grad():
        ref, _ = dream_reference(dream_pipe.model, prompt, 16, 5, "maskgit_plus", top_p=0.95)
    raw, _ = _run(dream_pipe, "dream-maskgit-plus", prompt, 16, 5, temperature=0.0, rank_on_processed=False)
    assert not torch.equal(raw, ref)


def _softmax_without_replacement(conf: torch.Tensor, alg_temp: float, k: int) -> dict[tuple[int, ...], float]:
    """Probability of each set of ``k`` positions drawn one after another, without replacement, each with
    probability ``softmax(conf / alg_temp)`` over those left (Dream's ``torch.multinomial`` of ``alg_temp``)."""
    w = torch.softmax(conf.double() / alg_temp, -1).tolist()
    out: dict[tuple[int, ...], float] = {}

    def walk(chosen: tuple[int, ...], p: float) -> None:
        if len(chosen) == k:
            key = tuple(sorted(chosen))
            out[key] = out.get(key, 0.0) + p
            return
        left = 1.0 - sum(w[j] for j in chosen)
        for j in range(len(w)):
            if j not in chosen:
                walk(chosen + (j,), p * w[j] / left)

    walk((), 1.0)
    return out


@pytest.mark.parametrize("confidence", ["probability", "margin", "entropy"])
@pytest.mark.parametrize("k", [1, 2])
def test_alg_temp_draws_positions_with_dreams_probabilities(confidence, k):
    """``alg_temp``: the ``k`` committed positions are drawn without replacement with probabilities
    ``softmax(c / alg_temp)`` over the ranked positions (c on Dream's scale: the probability itself)."""
    vocab, rows, alg_temp = 8, 20000, 0.3
    logits = torch.tensor(
        [[4.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0], [1.0, 1.2, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],
         [0.0, 0.0, 0.0, 3.0, 2.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]]
    )  # fmt: skip
    sched = ConfidenceUnmaskingScheduler(mask_token_id=vocab - 1, vocab_size=vocab, confidence=confidence,
                                         temperature=0.0, rank_on_processed=True, alg_temp=alg_temp)  # fmt: skip
    sched.set_timesteps(4 // k)
    sample = torch.full((rows, 4), vocab - 1)
    out = sched.step(logits.expand(rows, 4, vocab), sched.timesteps[0], sample, torch.Generator().manual_seed(0))
    committed = out.prev_sample != vocab - 1
    assert (committed.sum(1) == k).all()
    probs = torch.softmax(logits[:, :-1].double(), -1)
    top2 = probs.topk(2, -1).values
    conf = {"probability": top2[:, 0], "margin": top2[:, 0] - top2[:, 1],
            "entropy": (probs * probs.log()).sum(-1)}[confidence]  # fmt: skip
    expected = _softmax_without_replacement(conf, alg_temp, k)
    keys = [tuple(r.nonzero().flatten().tolist()) for r in committed]
    for key, p in expected.items():
        freq = sum(1 for c in keys if c == key) / rows
        assert abs(freq - p) < 4.5 * math.sqrt(p * (1 - p) / rows) + 1e-3, (key, freq, p)


def test_presets_of_the_families():
    dream = family_scheduler_presets("dream", mask_token_id=MASK, vocab_size=392)
    for name in ALGS:
        c = dream[name].config
        assert (c.transfer_schedule, c.transfer_eps, c.rank_on_processed) == ("dream", 1e-3, True), name
        assert c.alg_temp is None and (c.temperature, c.top_p) == (0.2, 0.95)
    for scheduler in family_scheduler_presets("llada", mask_token_id=126336, vocab_size=126464).values():
        assert scheduler.config.get("transfer_schedule") in (None, "even")
        assert not scheduler.config.get("rank_on_processed", False) and scheduler.config.get("alg_temp") is None


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(transfer_schedule="dream", transfer_eps=0.0), "transfer_eps"),
        (dict(transfer_schedule="dream", transfer_eps=1.0), "transfer_eps"),
        (dict(transfer_eps=float("nan")), "transfer_eps"),
        (dict(transfer_eps="1e-3"), "transfer_eps"),
        (dict(transfer_schedule="dreams"), "transfer_schedule"),
        (dict(rank_on_processed="yes"), "rank_on_processed"),
        (dict(alg_temp=-0.1), "alg_temp"),
        (dict(alg_temp=float("inf")), "alg_temp"),
        (dict(alg_temp=True), "alg_temp"),
        (dict(alg_temp=0.5, remasking="random"), "alg_temp"),
        (dict(alg_temp=0.5, confidence_threshold=0.9), "alg_temp"),
    ],
)
def test_bad_dream_options_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=392, **kwargs)
