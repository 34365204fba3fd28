"""Tests of DFMDataCollator (t, x_t, labels, couplings) and its fit with the model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dfm_hf import paths
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.schedulers import DiscreteFlowScheduler
from dfm_hf.training import DFMDataCollator

VOCAB = 50
MASK = 49
PAD = 0
T_MAX = 1.0 - 1e-3


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models on shared CPUs: one intra-op thread avoids oversubscription stalls (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def collator(**kwargs) -> DFMDataCollator:
    defaults = dict(
        source_distribution="mask",
        mask_token_id=MASK,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    defaults.update(kwargs)
    return DFMDataCollator(**defaults)


def clean_batch(batch: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def ragged_examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, MASK, (n,), generator=g).tolist()} for n in (12, 5, 9, 1, 12, 7)]


def test_shapes_dtypes_and_padding():
    examples = ragged_examples()
    out = collator(coupling={"unconditional": 1, "prefix": 1, "infill": 1})(examples)
    assert set(out) == {"input_ids", "timesteps", "labels", "condition_mask", "attention_mask", "kappa_rate"}
    assert out["input_ids"].shape == out["labels"].shape == out["condition_mask"].shape == (6, 12)
    assert out["attention_mask"].shape == (6, 12)
    assert out["timesteps"].shape == out["kappa_rate"].shape == (6,)
    assert out["input_ids"].dtype == out["labels"].dtype == torch.long
    assert out["timesteps"].dtype == out["kappa_rate"].dtype == torch.float32
    assert out["condition_mask"].dtype == torch.bool
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    real = torch.arange(12)[None] < lengths[:, None]
    assert torch.equal(out["attention_mask"].bool(), real)
    # padding is never corrupted, never scored, never conditioning
    assert (out["input_ids"][~real] == PAD).all()
    assert (out["labels"][~real] == -100).all()
    assert not out["condition_mask"][~real].any()
    padded = collator(pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape == (6, 16)


def test_conditioning_positions_are_clean_and_unscored():
    x1 = clean_batch(32, 20)
    for source in ("mask", "uniform"):
        out = collator(source_distribution=source, coupling={"prefix": 0.5, "infill": 0.5})(x1)
        cond = out["condition_mask"]
        assert cond.any()
        assert torch.equal(out["input_ids"][cond], x1[cond])
        assert (out["labels"][cond] == -100).all()


def test_mask_source_labels_only_at_masked_positions():
    x1 = clean_batch(16, 30)
    out = collator(coupling={"unconditional": 0.5, "prefix": 0.5})(x1)
    masked = out["input_ids"] == MASK
    scored = out["labels"] != -100
    assert torch.equal(scored, masked & ~out["condition_mask"])
    assert torch.equal(out["labels"][scored], x1[scored])
    # not masked -> holds x1
    assert torch.equal(out["input_ids"][~masked], x1[~masked])


def test_uniform_source_labels_at_all_generated_positions():
    x1 = clean_batch(16, 30)
    out = collator(source_distribution="uniform", coupling="prefix")(x1)
    scored = out["labels"] != -100
    assert torch.equal(scored, ~out["condition_mask"])
    assert torch.equal(out["labels"][scored], x1[scored])
    assert not (out["input_ids"] == MASK).any()  # uniform noise never uses the mask id
    assert (out["input_ids"] != x1).any()


def test_epsilon_prediction_labels_are_x0():
    x1 = clean_batch(16, 30)
    out = collator(prediction_type="epsilon")(x1)
    scored = out["labels"] != -100
    assert scored.any() and (out["labels"][scored] == MASK).all()
    out = collator(source_distribution="uniform", prediction_type="epsilon")(x1)
    moved = out["input_ids"] != x1  # there x_t = x0
    assert torch.equal(out["labels"][moved], out["input_ids"][moved])


def test_time_sampling_uniform_and_stratified():
    batch = 16
    uniform = collator()(clean_batch(batch, 4))["timesteps"]
    assert ((uniform >= 0) & (uniform <= T_MAX)).all()
    for seed in range(5):
        c = collator(time_sampling="stratified", t_max=0.5, generator=torch.Generator().manual_seed(seed))
        t = c(clean_batch(batch, 4))["timesteps"]
        strata = torch.floor(t / 0.5 * batch).long().sort().values
        assert torch.equal(strata, torch.arange(batch))
    # rows are not ordered by time
    assert not torch.equal(t.sort().values, t)


def test_prefix_layout():
    lengths = []
    c = collator(coupling="prefix")
    for seed in range(4):
        out = c(clean_batch(32, 10, seed=seed))
        for row in out["condition_mask"]:
            k = int(row.sum())
            assert torch.equal(row, torch.arange(10) < k)  # a contiguous prompt at the start
            lengths.append(k)
    assert min(lengths) == 0 and max(lengths) == 9  # 0..L-1 tokens of prompt


def _runs(row: torch.Tensor) -> int:
    """Number of maximal runs of False (spans to generate)."""
    gen = (~row).long()
    return int(gen[0]) + int(((gen[1:] - gen[:-1]) == 1).sum())


def test_infill_layout():
    c = collator(coupling="infill")
    spans = set()
    for seed in range(4):
        out = c(clean_batch(32, 24, seed=seed))
        for row in out["condition_mask"]:
            assert row[0] and row[-1]  # context on both sides
            n = _runs(row)
            assert 1 <= n <= 3
            spans.add(n)
    assert spans == {1, 2, 3}
    # ragged rows: spans stay inside each row's real tokens
    out = c(ragged_examples())
    lengths = out["attention_mask"].sum(1)
    for row, n in zip(out["condition_mask"], lengths.tolist()):
        if n >= 3:
            assert row[0] and row[n - 1] and not row[n:].any() and _runs(row[:n]) >= 1
        else:
            assert not row.any()


@pytest.mark.parametrize("schedule, exponent", [("polynomial", 1.0), ("polynomial", 2.0), ("cosine", 1.0)])
def test_corrupted_fraction_tracks_one_minus_kappa(schedule, exponent):
    c = collator(kappa_schedule=schedule, kappa_exponent=exponent, time_sampling="stratified")
    out = c(clean_batch(12, 3000))
    kappa = paths.get_kappa_schedule(schedule, exponent).kappa(out["timesteps"].double())
    fraction = (out["input_ids"] == MASK).double().mean(dim=1)
    assert (fraction - (1 - kappa)).abs().max() < 0.04
    rate = paths.get_kappa_schedule(schedule, exponent).rate(out["timesteps"].double()).float()
    torch.testing.assert_close(out["kappa_rate"], rate)


def test_uniform_source_fraction_tracks_one_minus_kappa():
    out = collator(source_distribution="uniform", time_sampling="stratified")(clean_batch(8, 4000))
    expected_changed = (1 - out["timesteps"].double()) * (1 - 1 / (VOCAB - 1))  # x0 may equal x1 by chance
    changed = (out["input_ids"] != clean_batch(8, 4000)).double().mean(dim=1)
    assert (changed - expected_changed).abs().max() < 0.04


def test_scheduler_config_is_used():
    scheduler = SimpleNamespace(
        config={
            "source_distribution": "uniform",
            "mask_token_id": MASK,
            "vocab_size": VOCAB,
            "kappa_schedule": "polynomial",
            "kappa_exponent": 3.0,
            "prediction_type": "sample",
        }
    )
    c = DFMDataCollator(scheduler=scheduler, generator=torch.Generator().manual_seed(0))
    assert (c.source_distribution, c.vocab_size, c.kappa_exponent) == ("uniform", VOCAB, 3.0)
    assert isinstance(c.schedule, paths.PolynomialKappa) and c.schedule.exponent == 3.0
    with pytest.raises(ValueError, match="source_distribution"):
        DFMDataCollator(scheduler=scheduler, source_distribution="mask")
    with pytest.raises(ValueError, match="scheduler"):
        DFMDataCollator(scheduler=object())


def test_real_scheduler_config_is_used():
    scheduler = DiscreteFlowScheduler(
        source_distribution="mask", mask_token_id=MASK, vocab_size=VOCAB, kappa_schedule="cosine"
    )
    c = DFMDataCollator(scheduler=scheduler)
    assert (c.source_distribution, c.mask_token_id, c.vocab_size) == ("mask", MASK, VOCAB)
    assert isinstance(c.schedule, paths.CosineKappa)


def test_example_condition_mask_is_kept_and_inputs_forms():
    x1 = clean_batch(2, 8)
    given = torch.zeros(8, dtype=torch.bool)
    given[2:5] = True
    examples = [{"input_ids": x1[0], "condition_mask": given}, {"input_ids": x1[1].tolist()}]
    out = collator(coupling="prefix")(examples)
    assert torch.equal(out["condition_mask"][0], given)
    assert torch.equal(out["input_ids"][0, 2:5], x1[0, 2:5])
    # a batch mapping and plain id lists work too
    mapping = collator()({"input_ids": x1, "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    assert mapping["input_ids"].shape == (2, 8)
    lists = collator()([row.tolist() for row in x1])
    assert lists["input_ids"].shape == (2, 8)


def test_generator_makes_batches_reproducible():
    x1 = clean_batch()
    a = collator(generator=torch.Generator().manual_seed(3), coupling={"prefix": 1, "infill": 1})(x1)
    b = collator(generator=torch.Generator().manual_seed(3), coupling={"prefix": 1, "infill": 1})(x1)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(coupling="suffix"), "coupling"),
        (dict(coupling={"prefix": -1.0}), "coupling"),
        (dict(coupling={"bogus": 1.0}), "coupling"),
        (dict(time_sampling="sobol"), "time_sampling"),
        (dict(t_max=0.0), "t_max"),
        (dict(t_max=1.5), "t_max"),
        (dict(prediction_type="v"), "prediction_type"),
        (dict(source_distribution="gaussian"), "source_distribution"),
        (dict(mask_token_id=None), "mask_token_id"),
        (dict(pad_token_id=VOCAB), "pad_token_id"),
        (dict(kappa_schedule="linear"), "kappa_schedule"),
        (dict(generator=0), "generator"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        collator(**kwargs)


def test_bad_features():
    with pytest.raises(ValueError, match="pad_token_id"):
        collator(pad_token_id=None)(ragged_examples())
    with pytest.raises(ValueError, match="input_ids"):
        collator()([[1, 2, VOCAB]])
    with pytest.raises(ValueError, match="features"):
        collator()([])


@pytest.mark.parametrize("loss", ["ce", "generalized_kl"])
def test_batches_feed_the_model_and_the_training_loss(loss):
    """A collated batch runs through the model (logits at the scored positions only) into the training loss of
    ``--loss``, which equals the formula written out here and back-propagates."""
    from dfm_hf.training.losses import batch_loss

    torch.manual_seed(0)
    config = DFMConfig.from_preset(
        "tiny", vocab_size=VOCAB, mask_token_id=MASK, pad_token_id=PAD, time_conditioning=True
    )
    model = DFMForMaskedGeneration(config)
    batch = collator(coupling={"unconditional": 1, "prefix": 1, "infill": 1})(ragged_examples())
    scored = batch["labels"] != -100
    inputs = {k: batch[k] for k in ("input_ids", "timesteps", "attention_mask")}
    logits = model(**inputs, logits_to_keep=scored).logits
    assert logits.shape == (int(scored.sum()), VOCAB)
    value = batch_loss(logits, batch, loss)
    log_p = torch.log_softmax(model(**inputs).logits.double(), dim=-1)[scored]  # every position, then picked
    x1, x_t = batch["labels"][scored], batch["input_ids"][scored]
    log_p_x1 = log_p.gather(-1, x1[:, None])[:, 0]
    if loss == "ce":
        expected = -log_p_x1.mean()
    else:  # x_t is the mask token at every scored position: delta = 0
        rate = batch["kappa_rate"][:, None].expand(scored.shape)[scored].double()
        expected = (-rate * (log_p.gather(-1, x_t[:, None])[:, 0].exp() + log_p_x1)).mean()
    assert torch.isfinite(value) and value.item() > 0
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5)
    value.backward()
    assert model.model.embed_tokens.weight.grad is not None
