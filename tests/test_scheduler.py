"""DiscreteFlowScheduler and ConfidenceUnmaskingScheduler: exactness in the limit, contract, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dfm_hf import paths
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler

D = 3  # data tokens 0..2
MASK = 3
V = 4
N = 3


def _target() -> dict[tuple[int, ...], float]:
    """A correlated distribution over [D]^N: equal neighbours are favoured, one sequence is impossible."""
    g = torch.Generator().manual_seed(0)
    weights = {}
    for x in itertools.product(range(D), repeat=N):
        w = 0.2 + torch.rand((), generator=g).item()
        w *= 4.0 if x[0] == x[1] else 1.0
        w *= 3.0 if x[1] != x[2] else 1.0
        weights[x] = 0.0 if x == (2, 2, 2) else w
    total = sum(weights.values())
    return {x: w / total for x, w in weights.items()}


TARGET = _target()
SEQS = torch.tensor(list(TARGET.keys()))  # (27, N)
PROBS = torch.tensor(list(TARGET.values()), dtype=torch.float64)


def exact_posterior_logits(z: torch.Tensor, t: float, source: str, schedule: paths.KappaSchedule) -> torch.Tensor:
    """log p_{1|t}(x^i | z) by enumeration of [D]^N, for a batch of states z (B, N)."""
    k = float(schedule.kappa(t))
    match = (SEQS.unsqueeze(0) == z.unsqueeze(1)).to(torch.float64)  # (B, S, N)
    if source == "mask":
        visible = (z != MASK).unsqueeze(1)
        lik = torch.where(visible, match, torch.ones_like(match)).prod(-1)  # consistent with visible tokens
    else:
        lik = (k * match + (1.0 - k) / D).prod(-1)
    post = lik * PROBS.unsqueeze(0)  # (B, S)
    post = post / post.sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(SEQS, V).to(torch.float64)  # (S, N, V)
    p1 = torch.einsum("bs,snv->bnv", post, onehot)
    return torch.log(p1.clamp_min(1e-30)).float()


def run_sampler(scheduler, steps: int, batch: int, seed: int = 0) -> torch.Tensor:
    c = scheduler.config
    g = torch.Generator().manual_seed(seed)
    if c.source_distribution == "mask":
        x = torch.full((batch, N), MASK)
    else:
        x = paths.sample_uniform_tokens((batch, N), V, MASK, g)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        logits = exact_posterior_logits(x, float(t), c.source_distribution, scheduler.schedule)
        x = scheduler.step(logits, t, x, generator=g).prev_sample
    return x


def tv_to_target(x: torch.Tensor) -> float:
    assert not (x == MASK).any()
    codes = (x * torch.tensor([D * D, D, 1])).sum(-1)
    emp = torch.bincount(codes, minlength=D**N).double() / x.shape[0]
    ref_codes = (SEQS * torch.tensor([D * D, D, 1])).sum(-1)
    ref = torch.zeros(D**N, dtype=torch.float64)
    ref[ref_codes] = PROBS
    return 0.5 * (emp - ref).abs().sum().item()


CASES = [
    dict(source_distribution="mask", kappa_schedule="polynomial", kappa_exponent=1.0),
    dict(source_distribution="mask", kappa_schedule="polynomial", kappa_exponent=3.0),
    dict(source_distribution="mask", kappa_schedule="cosine"),
    dict(source_distribution="mask", kappa_schedule="polynomial", kappa_exponent=2.0, corrector_alpha=5.0),
    dict(source_distribution="uniform", kappa_schedule="polynomial", kappa_exponent=1.0),
    dict(source_distribution="uniform", kappa_schedule="cosine"),
    dict(source_distribution="uniform", kappa_schedule="polynomial", kappa_exponent=2.0, corrector_alpha=3.0),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_converges_to_target_with_exact_posterior(cfg):
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, **cfg)
    batch = 20000
    tv_many = tv_to_target(run_sampler(sched, 200, batch))
    tv_one = tv_to_target(run_sampler(sched, 1, batch))
    # sampling noise alone gives TV ~ 0.01 at this batch size; one step ignores the correlations
    assert tv_many < 0.03, tv_many
    assert tv_one > tv_many + 0.03, (tv_one, tv_many)


BLOCK_CASES = [
    dict(block_length=2, kappa_schedule="polynomial", kappa_exponent=1.0),
    dict(block_length=2, kappa_schedule="cosine", time_spacing="cosine"),
    dict(block_length=2, kappa_schedule="polynomial", kappa_exponent=2.0, corrector_alpha=5.0),
]


@pytest.mark.parametrize("cfg", BLOCK_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_block_wise_dfm_converges_to_the_target_block_by_block(cfg):
    """Blocks [x0 x1] then [x2]: the first block's flow must reach the marginal of (x0, x1), the second the exact
    conditional of x2 given them, so the joint is the target; with one step per block x0 and x1 are drawn
    independently (the correlation is lost)."""
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, **cfg)
    batch = 20000
    tv_many = tv_to_target(run_sampler(sched, 200, batch))
    tv_one = tv_to_target(run_sampler(sched, 2, batch))
    assert tv_many < 0.03, tv_many
    assert tv_one > tv_many + 0.03, (tv_one, tv_many)


def test_block_length_one_is_exact_autoregressive_sampling_and_later_blocks_wait():
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, block_length=1)
    assert tv_to_target(run_sampler(sched, 3, 20000)) < 0.02  # one step per token from its exact conditional
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, block_length=2, corrector_alpha=5.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.full((256, N), MASK)
    for i, t in enumerate(sched.timesteps):
        plan = sched.plan_step(x, t, generator=g)
        assert not plan.window[:, 2].any() if i < 5 else not plan.window[:, :2].any()
        assert int(plan.window_index[0]) == (1 if i < 5 else 2)
        logits = exact_posterior_logits(x, 0.5, "mask", sched.schedule)
        x = sched.step(logits, t, x, generator=g, plan=plan).prev_sample
        if i < 5:
            assert (x[:, 2] == MASK).all()  # the second block waits masked
        if i == 4:
            assert not (x[:, :2] == MASK).any()  # the first block is done at its last step
    assert not (x == MASK).any()


def test_block_wise_dfm_refuses_the_uniform_source():
    with pytest.raises(ValueError, match="block_length"):
        DiscreteFlowScheduler(source_distribution="uniform", vocab_size=V, block_length=2)


def test_few_steps_worse_than_many_monotone_trend():
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, source_distribution="uniform")
    tvs = [tv_to_target(run_sampler(sched, s, 20000, seed=1)) for s in (1, 4, 128)]
    assert tvs[0] > tvs[1] > tvs[2]


def test_mask_token_never_drawn_and_last_step_resolves_everything():
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V)
    sched.set_timesteps(5)
    x = torch.full((64, 10), MASK)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        logits = torch.zeros(64, 10, V)
        logits[..., MASK] = 50.0  # an untrained model that loves the mask token
        x = sched.step(logits, t, x, generator=g).prev_sample
    assert not (x == MASK).any()


def test_conditioning_positions_never_change_with_corrector():
    for source in ("mask", "uniform"):
        sched = DiscreteFlowScheduler(
            source_distribution=source, mask_token_id=MASK, vocab_size=V, corrector_alpha=10.0
        )
        sched.set_timesteps(20)
        g = torch.Generator().manual_seed(0)
        x = torch.full((16, 8), MASK) if source == "mask" else torch.randint(0, D, (16, 8), generator=g)
        cond = torch.zeros(16, 8, dtype=torch.bool)
        cond[:, :3] = True
        x[:, :3] = 1
        for t in sched.timesteps:
            x = sched.step(torch.randn(16, 8, V, generator=g), t, x, generator=g, condition_mask=cond).prev_sample
            assert (x[:, :3] == 1).all()
        assert not (x == MASK).any()


def test_plan_then_packed_logits_equals_full_logits():
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, kappa_exponent=2.0)
    sched.set_timesteps(8)
    logits_g = torch.Generator().manual_seed(3)
    x_full = x_packed = torch.full((4, 12), MASK)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        logits = torch.randn(4, 12, V, generator=logits_g)
        x_full = sched.step(logits, t, x_full, generator=g1).prev_sample
        plan = sched.plan_step(x_packed, t, generator=g2)
        # the plan is explicit: a copy of the sample gets exactly the same step
        x_packed = sched.step(logits[plan.positions], t, x_packed.clone(), generator=g2, plan=plan).prev_sample
    assert torch.equal(x_full, x_packed)


@pytest.mark.parametrize("cls", ["flow", "confidence"])
def test_step_plan_is_explicit_and_checked(cls):
    if cls == "flow":
        sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, corrector_alpha=1.0)
    else:
        sched = ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=V, temperature=1.0)
    sched.set_timesteps(4)
    x = torch.full((3, 6), MASK)
    t0, t1 = sched.timesteps[0], sched.timesteps[1]
    plan = sched.plan_step(x, t0, generator=torch.Generator().manual_seed(0))
    assert plan.positions.shape == x.shape and plan.positions.dtype == torch.bool and plan.step_index == 0
    assert plan.counts == plan.positions.sum(1).tolist()
    assert not hasattr(sched, "_plan")  # no hidden plan state on the scheduler
    logits = torch.randn(3, 6, V, generator=torch.Generator().manual_seed(1))
    a = sched.step(logits[plan.positions], t0, x.clone(), generator=torch.Generator().manual_seed(2), plan=plan)
    b = sched.step(logits, t0, x, generator=torch.Generator().manual_seed(2), plan=plan)
    assert torch.equal(a.prev_sample, b.prev_sample)
    moved = a.prev_sample != x
    assert bool((plan.positions | ~moved).all())  # only planned positions moved
    with pytest.raises(ValueError, match="plan"):
        sched.step(logits, t1, x, plan=plan)  # made for step 0
    with pytest.raises(ValueError, match="plan"):
        sched.step(logits[:2], t0, x[:2], plan=plan)
    with pytest.raises(ValueError, match="plan"):
        sched.step(logits, t0, x, plan=plan.positions)


def test_per_row_generators_make_rows_independent_of_batch():
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, corrector_alpha=2.0)
    sched.set_timesteps(10)

    def run(rows):
        gens = [torch.Generator().manual_seed(s) for s in rows]
        x = torch.full((len(rows), 6), MASK)
        for t in sched.timesteps:
            logits = torch.stack([torch.randn(6, V, generator=torch.Generator().manual_seed(s)) for s in rows])
            x = sched.step(logits, t, x, generator=gens).prev_sample
        return x

    alone = run([7])
    mixed = run([3, 7, 11])
    assert torch.equal(alone[0], mixed[1])


def test_temperature_zero_is_greedy_and_top_k_one_too():
    for kwargs in (dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6)):
        sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, **kwargs)
        sched.set_timesteps(1)
        logits = torch.tensor([[[0.0, 2.0, 1.0, 9.0]]]).expand(8, 5, V)
        x = sched.step(logits, sched.timesteps[0], torch.full((8, 5), MASK)).prev_sample
        assert (x == 1).all()


@pytest.mark.parametrize("vocab", [5, 127, 128, 129, 300, 4096])
@pytest.mark.parametrize("forbidden", [None, 0, -1, 3])
def test_greedy_log_probability_matches_a_float64_reference_with_ties(vocab, forbidden):
    from dfm_hf.schedulers.sampling import greedy_with_log_probability

    f = None if forbidden is None else forbidden % vocab
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(23, vocab, generator=g)
    x[:6] = x[:6].round()  # many ties: the first index wins, as argmax
    x[6, -1] = x[6].max() + 1.0  # the max in the last column (a tail group when vocab % 128 != 0)
    if f is not None:
        x[7, f] = x[7].max() + 1.0  # the forbidden token is the max
        x[8, f] = x[8].max()  # it ties the max
    tokens, scores = greedy_with_log_probability(x, f)
    ref = x.double().clone()
    if f is not None:
        ref[:, f] = -math.inf
    expected = ref.argmax(-1)
    assert torch.equal(tokens, expected)
    assert f is None or not (tokens == f).any()
    lse = torch.logsumexp(ref, -1)
    torch.testing.assert_close(scores.double(), ref.gather(1, expected[:, None])[:, 0] - lse, atol=1e-6, rtol=0)
    assert torch.equal(x, x.clone())  # the rows are not written
    bad = x.clone()
    bad[2, (0 if f is None else f + 1) % vocab] = math.nan  # not the forbidden column
    with pytest.raises(ValueError, match="NaN"):
        greedy_with_log_probability(bad, f)
    if f is not None:
        only = torch.full((2, vocab), -math.inf)
        only[:, f] = 0.0
        with pytest.raises(ValueError, match="only finite logit is the mask"):
            greedy_with_log_probability(only, f)


def test_save_load_from_config_and_compatibles(tmp_path):
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, kappa_schedule="cosine", corrector_alpha=1.5)
    sched.save_pretrained(tmp_path)
    loaded = DiscreteFlowScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(sched.config)
    cubic = DiscreteFlowScheduler.from_config(loaded.config, kappa_schedule="polynomial", kappa_exponent=3.0)
    assert cubic.config.kappa_exponent == 3.0 and cubic.config.mask_token_id == MASK
    assert ConfidenceUnmaskingScheduler in sched.compatibles
    conf = ConfidenceUnmaskingScheduler.from_config(sched.config)
    assert conf.config.mask_token_id == MASK
    assert DiscreteFlowScheduler in conf.compatibles


def test_add_noise_matches_kappa():
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, kappa_exponent=2.0)
    x1 = torch.zeros(200, 100, dtype=torch.long)
    x0 = torch.full_like(x1, MASK)
    xt = sched.add_noise(x1, x0, torch.full((200,), 0.5), generator=torch.Generator().manual_seed(0))
    assert abs((xt == 0).double().mean().item() - 0.25) < 0.01
    uni = paths.sample_uniform_tokens((10000,), V, MASK, torch.Generator().manual_seed(0))
    assert not (uni == MASK).any() and set(uni.unique().tolist()) == {0, 1, 2}


def test_kappa_derivatives_match_finite_differences():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    for sch in (paths.PolynomialKappa(1.0), paths.PolynomialKappa(2.5), paths.CosineKappa()):
        fd = (sch.kappa(t + 1e-6) - sch.kappa(t - 1e-6)) / 2e-6
        assert torch.allclose(sch.d_kappa(t), fd, atol=1e-6)
        assert float(sch.kappa(0.0)) == 0.0 and math.isclose(float(sch.kappa(1.0)), 1.0)


def test_confidence_scheduler_unmasks_most_confident_first():
    sched = ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=V)
    sched.set_timesteps(3)
    x = torch.full((1, 6), MASK)
    logits = torch.zeros(1, 6, V)
    for j, strength in enumerate([1.0, 6.0, 2.0, 5.0, 3.0, 4.0]):
        logits[0, j, j % D] = strength
    x = sched.step(logits, sched.timesteps[0], x).prev_sample
    assert (x[0] != MASK).tolist() == [False, True, False, True, False, False]
    for t in sched.timesteps[1:]:
        x = sched.step(logits, t, x).prev_sample
    assert not (x == MASK).any()


def _toy_denoiser(vocab: int, mask: int, seed: int = 0):
    """A fixed, input-dependent logits function (B, L) -> (B, L, vocab); the mask token is never predicted."""
    g = torch.Generator().manual_seed(seed)
    emb, mix, pos = torch.randn(vocab, vocab, generator=g), torch.randn(vocab, vocab, generator=g), None

    def f(x: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        if pos is None or pos.shape[0] != x.shape[1]:
            pos = torch.randn(x.shape[1], vocab, generator=torch.Generator().manual_seed(seed + 1))
        onehot = torch.nn.functional.one_hot(x, vocab).float()
        logits = emb[x] + (onehot.mean(1, keepdim=True) @ mix) * 4 + pos
        logits[..., mask] = -1e9
        return logits

    return f


def _llada_reference(model, prompt: torch.Tensor, gen: int, steps: int, block: int, mask: int) -> torch.Tensor:
    """LLaDA's semi-autoregressive greedy low-confidence remasking, written from the paper's algorithm."""
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen), mask)], 1)
    blocks, start0 = gen // block, prompt.shape[1]
    per_block = steps // blocks
    for b in range(blocks):
        lo, hi = start0 + b * block, start0 + (b + 1) * block
        m = (x[:, lo:hi] == mask).sum(1)
        counts = [(m // per_block) + (j < m % per_block).long() for j in range(per_block)]  # even split, front-loaded
        for j in range(per_block):
            masked = x == mask
            logits = model(x)
            tokens = logits.argmax(-1)
            conf = torch.softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            conf[:, hi:] = -float("inf")
            conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
            for r in range(x.shape[0]):
                top = conf[r].topk(int(counts[j][r])).indices
                x[r, top] = tokens[r, top]
    return x


@pytest.mark.parametrize("gen, steps, block", [(16, 8, 4), (24, 6, 8), (12, 12, 12)])
def test_confidence_blocks_match_llada_reference(gen, steps, block):
    vocab, mask = 11, 10
    model = _toy_denoiser(vocab, mask)
    prompt = torch.randint(0, mask, (3, 5), generator=torch.Generator().manual_seed(1))
    ref = _llada_reference(model, prompt, gen, steps, block, mask)
    sched = ConfidenceUnmaskingScheduler(mask_token_id=mask, vocab_size=vocab, block_length=block)
    sched.set_timesteps(steps)
    x = torch.cat([prompt, torch.full((3, gen), mask)], 1)
    cond = torch.zeros_like(x, dtype=torch.bool)
    cond[:, :5] = True
    for t in sched.timesteps:
        plan = sched.plan_step(x, t, condition_mask=cond)
        x = sched.step(model(x)[plan.positions], t, x, condition_mask=cond, plan=plan).prev_sample  # packed rows
    assert torch.equal(x, ref)


def test_confidence_blocks_open_left_to_right_and_finish():
    mask, vocab = 10, 11
    model = _toy_denoiser(vocab, mask, seed=3)
    for steps, block, gen in [(4, 4, 8), (3, 4, 32), (10, 4, 32), (7, 5, 13)]:
        sched = ConfidenceUnmaskingScheduler(mask_token_id=mask, vocab_size=vocab, block_length=block)
        sched.set_timesteps(steps)
        x = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.full((2, gen), mask)], 1)
        cond = torch.zeros_like(x, dtype=torch.bool)
        cond[:, :3] = True
        for t in sched.timesteps:
            needs = sched.plan_step(x, t, condition_mask=cond).positions
            assert not needs[:, :3].any()
            for r in range(2):  # everything left of the first open position is committed (earlier blocks done)
                if needs[r].any():
                    first = int(needs[r].long().argmax())
                    assert not (x[r, :first] == mask).any()
            before = x.clone()
            x = sched.step(model(x), t, x, condition_mask=cond).prev_sample
            moved = x != before
            assert bool((needs | ~moved).all()), "a position outside the open blocks moved"
        assert not (x == mask).any(), (steps, block, gen)
    # a block as long as the generation is the global (block-free) sampler
    x0 = torch.full((2, 12), mask)
    outs = []
    for block in (None, 12, 50):
        sched = ConfidenceUnmaskingScheduler(mask_token_id=mask, vocab_size=vocab, block_length=block)
        sched.set_timesteps(5)
        x = x0.clone()
        for t in sched.timesteps:
            x = sched.step(model(x), t, x).prev_sample
        outs.append(x)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for bad in (0, -3, 2.5, True, "32"):
        with pytest.raises(ValueError, match="block_length"):
            ConfidenceUnmaskingScheduler(mask_token_id=mask, block_length=bad)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(kappa_schedule="linearish", mask_token_id=1), "kappa_schedule"),
        (dict(source_distribution="gauss", mask_token_id=1), "source_distribution"),
        (dict(prediction_type="v", mask_token_id=1), "prediction_type"),
        (dict(kappa_exponent=0.0, mask_token_id=1), "kappa_exponent"),
        (dict(kappa_exponent=-2, mask_token_id=1), "kappa_exponent"),
        (dict(), "mask_token_id"),
        (dict(mask_token_id=10, vocab_size=10), "mask_token_id"),
        (dict(source_distribution="uniform"), "vocab_size"),
        (dict(mask_token_id=1, temperature=-1.0), "temperature"),
        (dict(mask_token_id=1, top_p=0.0), "top_p"),
        (dict(mask_token_id=1, top_k=0), "top_k"),
        (dict(mask_token_id=1, corrector_alpha=float("nan")), "corrector_alpha"),
        (dict(mask_token_id=1, sampling_dtype="float16"), "sampling_dtype"),
    ],
)
def test_bad_config_raises_naming_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DiscreteFlowScheduler(**kwargs)


def test_bad_step_inputs():
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V)
    x = torch.full((2, 5), MASK)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(2, 5, V), 0.0, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="model_output"):
        sched.step(torch.zeros(2, 6, V), sched.timesteps[0], x)
    with pytest.raises(ValueError, match="vocab_size"):
        sched.step(torch.zeros(2, 5, V + 1), sched.timesteps[0], x)
    bad = torch.zeros(2, 5, V)
    bad[0, 0, 0] = float("nan")
    sched.set_timesteps(1)
    with pytest.raises(ValueError, match="model_output"):
        sched.step(bad, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(torch.zeros(2, 5, V), 0.37, x)
    eps = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=V, prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        eps.set_timesteps(4)


# --------------------------------------------------------------------------- the time grid, exactly


@pytest.mark.parametrize("steps", [2000, 4096])
def test_cosine_grids_run_every_step_in_order_and_land_on_one(steps: int) -> None:
    """Neighbouring cosine times near 0 lie closer than any fixed tolerance (some are equal in float32): the step
    counter, checked exactly against the grid, reads each of them as its own step, and the flow ends at t = 1."""
    sched = DiscreteFlowScheduler(mask_token_id=3, vocab_size=8, time_spacing="cosine", corrector_alpha=0.0)
    sched.set_timesteps(steps)
    x = torch.full((2, 6), 3)
    logits = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    for t in sched.timesteps:
        plan = sched.plan_step(x, t, generator=torch.Generator().manual_seed(len(seen)))
        seen.append(plan.step_index)
        x = sched.step(logits, t, x, plan=plan).prev_sample
    assert seen == list(range(steps))
    assert not (x == 3).any()  # every position jumped by t = 1


def test_a_million_uniform_steps_and_out_of_order_times_map_exactly() -> None:
    sched = DiscreteFlowScheduler(mask_token_id=3, vocab_size=8)
    sched.set_timesteps(1_000_000)
    times = sched.timesteps
    for i in (0, 1, 2, 499_999, 500_000, 999_998, 999_999):
        assert sched._index_for(times[i]) == i  # the float32 value of `timesteps`, out of order
        assert sched._index_for(i / 1_000_000) == i  # the exact grid value
        assert sched._index_for(i) == i  # an int is a step index, as in diffusers' discrete schedulers
    with pytest.raises(ValueError, match="is not on the grid"):
        sched._index_for(0.5 + 1e-7)
    with pytest.raises(ValueError, match=r"step index must be in \[0, 1000000\)"):
        sched._index_for(1_000_000)


def test_the_accelerator_path_uses_the_counter_without_reading_the_time() -> None:
    """A tensor on another device is not read back: the counter gives the step (a meta tensor has no value at all)."""
    sched = ConfidenceUnmaskingScheduler(mask_token_id=3, vocab_size=8)
    sched.set_timesteps(5)
    meta = torch.empty((), device="meta")
    assert sched._index_for(meta) == 0
    sched._step_index = 3
    assert sched._index_for(meta) == 3
    assert sched._index_for(sched.timesteps[1]) == 1  # a CPU tensor is read: any grid time, in any order
