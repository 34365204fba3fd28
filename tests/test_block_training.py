"""Block-diffusion training (issue 26, section 2): BD3-LM's vectorized objective ``[x_t | x_1]`` in one forward equals a
loop of forwards over blocks on ``[clean earlier blocks, noisy block]`` (with and without the logit shift of a
converted causal LM, with padding); complementary masks score every position once per pair; ``--block_size`` reaches
the model config from scratch, after a causal-LM conversion, with LoRA; a converted tiny Llama trains, resumes and its
loss falls. Everything is tiny and single-threaded."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import pytest
import torch
from helpers import STDLIB, tiny_pipeline, tiny_tokenizer
from run_logs import losses, read_log

from dfm_hf import paths
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.schedulers import DiscreteFlowScheduler
from dfm_hf.training.adapters import ADAPTER_SUBFOLDER, BASE_RECIPE_FILE, base_recipe, load_adapted_pipeline
from dfm_hf.training.arguments import build_parser, validate_args, validate_block_diffusion
from dfm_hf.training.batches import BatchPlan, draw_micro_batch, make_collator
from dfm_hf.training.block_diffusion import block_diffusion_inputs, block_diffusion_logits, scored_logits
from dfm_hf.training.checkpoints import STATE_FILE, config_signature, resolve_resume, training_recipe
from dfm_hf.training.collator import DFMDataCollator, inverse_kappa
from dfm_hf.training.lora_finetune import main as lora_main
from dfm_hf.training.losses import batch_loss
from dfm_hf.training.train import evaluate_model, main, make_optimizer, train_step

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB, MASK_ID, K = 64, 63, 4
MASK = "<|dfm_mask|>"


def block_model(logits_shift: bool, time_conditioning: bool = False, seed: int = 0) -> DFMForMaskedGeneration:
    """A tiny random block model (K = 4) whose weights are all non-trivial (adaLN included)."""
    config = DFMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       mask_token_id=MASK_ID, pad_token_id=0, block_size=K, logits_shift=logits_shift,
                       time_conditioning=time_conditioning, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = DFMForMaskedGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of 11 / 7 / 9 real tokens (the last one left-padded), about half of them masked and scored."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = (11, 7, 9), (False, False, True)
    real = torch.zeros(3, 11, dtype=torch.long)
    for r, (n, is_left) in enumerate(zip(lengths, left)):
        if is_left:
            real[r, 11 - n :] = 1
        else:
            real[r, :n] = 1
    clean = torch.randint(1, MASK_ID, (3, 11), generator=g) * real
    cond = torch.zeros(3, 11, dtype=torch.bool)
    cond[0, :3] = True  # a prompt: never masked, never scored
    masked = (torch.rand(3, 11, generator=g) < 0.5) & (real != 0) & ~cond
    noisy = torch.where(masked, torch.full_like(clean, MASK_ID), clean)
    t = torch.rand(3, generator=g) * 0.9
    return {
        "input_ids": noisy,
        "clean_ids": clean,
        "attention_mask": real,
        "condition_mask": cond,
        "labels": torch.where(masked, clean, torch.full_like(clean, -100)),
        "timesteps": t,
        "kappa_rate": 1.0 / (1.0 - t),
    }


def per_block_logits(model: DFMForMaskedGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: per row (padding dropped) and per block ``b``, one forward on ``[clean blocks < b, noisy block
    b]`` with the model's own block pattern and logit shift; the logits of the scored positions, row-major."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][r] != 0
        clean, noisy, labels = (batch[k][r][real] for k in ("clean_ids", "input_ids", "labels"))
        n = clean.numel()
        logits = torch.empty(n, VOCAB)
        for start in range(0, n, K):
            end = min(start + K, n)
            ids = torch.cat([clean[:start], noisy[start:end]])[None]
            logits[start:end] = model(input_ids=ids, timesteps=batch["timesteps"][r : r + 1]).logits[0, start:end]
        out.append(logits[labels != -100])
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logits_shift", [False, True])
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_vectorized_objective_equals_a_loop_of_forwards_over_blocks(logits_shift, time_conditioning):
    model = block_model(logits_shift, time_conditioning)
    batch = padded_batch()
    scored = batch["labels"] != -100
    positions = (batch["attention_mask"].cumsum(1) - 1)[scored]
    assert ((positions % K == 0) & (positions > 0)).any()  # block openings are scored (the shift reads clean there)
    with torch.no_grad():
        vectorized = block_diffusion_logits(model, batch, K)
        reference = per_block_logits(model, batch)
        assert vectorized.shape == reference.shape == (int(scored.sum()), VOCAB)
        torch.testing.assert_close(vectorized, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scored_logits(model, batch), vectorized)  # the dispatch of train / evaluate
        for loss, weighting in (("ce", "none"), ("generalized_kl", "none"), ("ce", "inverse_t")):
            torch.testing.assert_close(
                batch_loss(vectorized, batch, loss, weighting),
                batch_loss(reference, batch, loss, weighting),
                atol=1e-5,
                rtol=1e-5,
            )
        # x_t alone under the block-causal pattern (noisy earlier blocks) is another objective
        alone = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      timesteps=batch["timesteps"], logits_to_keep=scored).logits  # fmt: skip
        assert (alone - reference).abs().max() > 1e-3


def test_inputs_of_a_padded_batch():
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    ids = torch.arange(14).view(2, 7)
    inputs = block_diffusion_inputs(ids, ids + 100, real, block_size=2)
    assert torch.equal(inputs["input_ids"], torch.cat([ids, ids + 100], 1))
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 5] * 2, [0, 0, 0, 1, 2, 3, 4] * 2]
    mask = inputs["attention_mask"]
    assert mask.shape == (2, 1, 14, 14) and mask.dtype == torch.bool
    sees = mask[0, 0]
    assert sees[2].tolist() == [False, False, True, True] + [False] * 3 + [True, True] + [False] * 5  # noisy pos 2
    assert sees[7 + 2].tolist() == [False] * 7 + [True] * 4 + [False] * 3  # clean pos 2: clean blocks 0 and 1
    pads, reals = [0, 1, 7, 8], [2, 3, 4, 5, 6, 9, 10, 11, 12, 13]
    assert not mask[1, 0][reals][:, pads].any()  # no real query sees the left padding
    with pytest.raises(ValueError, match="share one"):
        block_diffusion_inputs(ids, ids[:, :5], real, 2)
    with pytest.raises(ValueError, match="return_clean_ids"):
        block_diffusion_logits(block_model(False), {k: v for k, v in padded_batch().items() if k != "clean_ids"}, K)


# ---------------------------------------------------------------------------------------------------------------------
# Complementary masks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["polynomial", "cosine"])
def test_complementary_masks_score_every_position_once_per_pair(schedule):
    collator = DFMDataCollator(source_distribution="mask", mask_token_id=MASK_ID, vocab_size=VOCAB,
                               kappa_schedule=schedule, kappa_exponent=2.0 if schedule == "polynomial" else None,
                               coupling={"unconditional": 1, "prefix": 1, "infill": 1}, pad_token_id=0,
                               complementary_masks=True, return_clean_ids=True,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    rows = [torch.randint(1, MASK_ID, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in range(9, 25)]
    batch = collator(rows)
    assert batch["input_ids"].shape == (32, 24)  # 16 rows, each followed by its complement
    scored = (batch["labels"] != -100).view(16, 2, 24)
    real = (batch["attention_mask"] != 0).view(16, 2, 24)
    cond = batch["condition_mask"].view(16, 2, 24)
    clean = batch["clean_ids"].view(16, 2, 24)
    assert torch.equal(clean[:, 0], clean[:, 1]) and torch.equal(cond[:, 0], cond[:, 1])
    corruptible = real[:, 0] & ~cond[:, 0]
    assert torch.equal(scored[:, 0] ^ scored[:, 1], corruptible) and not (scored[:, 0] & scored[:, 1]).any()
    assert cond.any() and scored.any()
    # the complement is a sample of the path at t' with 1 - kappa_t' = kappa_t
    sched = paths.get_kappa_schedule(schedule, 2.0)
    t = batch["timesteps"].view(16, 2).double()
    expected = (1.0 - sched.kappa(t[:, 0])).clamp(max=1.0)
    inside = t[:, 1] < collator.t_max - 1e-6  # t' is clipped to t_max
    torch.testing.assert_close(sched.kappa(t[:, 1])[inside], expected[inside], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch["kappa_rate"], sched.rate(batch["timesteps"].double()).float())
    with pytest.raises(ValueError, match="complementary_masks"):
        DFMDataCollator(source_distribution="uniform", vocab_size=VOCAB, complementary_masks=True)
    for name in ("polynomial", "cosine"):
        target = torch.linspace(0, 1, 11, dtype=torch.float64)
        torch.testing.assert_close(paths.get_kappa_schedule(name, 3.0).kappa(inverse_kappa(
            paths.get_kappa_schedule(name, 3.0), target)), target)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Flags, config, resume
# ---------------------------------------------------------------------------------------------------------------------


def parsed(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["--stdlib", "--output_dir", "never-written", "--seq_len", "32", *argv])
    validate_args(args)
    return args


def test_block_size_flag_reaches_the_config_and_bad_values_are_named():
    assert parsed("--block_size", "8").model_config_fields["block_size"] == 8
    assert "block_size" not in parsed().model_config_fields
    assert parsed("--model_config_overrides", '{"block_size": 2}').model_config_fields["block_size"] == 2
    for argv, message in [
        (["--block_size", "0"], r"--block_size.*\[1, --seq_len=32\]"),
        (["--block_size", "33"], r"--block_size.*got 33"),
        (["--block_size", "4", "--attention_annealing_steps", "10"], "--attention_annealing_steps"),
        (["--model_config_overrides", '{"block_size": 0}'], "block_size"),
    ]:
        with pytest.raises(ValueError, match=message):
            parsed(*argv)
    args = parsed("--complementary_masks")
    with pytest.raises(ValueError, match="--complementary_masks.*mask source"):
        validate_block_diffusion(args, None, "uniform")
    with pytest.raises(ValueError, match="--attention_annealing_steps.*block_size=4"):
        validate_block_diffusion(argparse.Namespace(attention_annealing_steps=3, complementary_masks=False), 4)
    assert training_recipe(args)["complementary_masks"] is True and "complementary_masks" not in training_recipe(
        parsed()
    )
    recipe = base_recipe(argparse.Namespace(init_from_causal_lm="m", init_from_pretrained=None, gguf_file=None,
                                            mask_token=None, mask_token_id=None, block_size=4))  # fmt: skip
    assert recipe["block_size"] == 4


def test_a_checkpoint_of_another_block_size_is_refused(tmp_path):
    tok = tiny_tokenizer()
    config = DFMConfig.from_preset("tiny", tokenizer=tok, block_size=4)
    assert config_signature(config)["block_size"] == 4
    assert "block_size" not in config_signature(DFMConfig.from_preset("tiny", tokenizer=tok))
    args = parsed("--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest")
    folder = tmp_path / "checkpoints" / "checkpoint-2"
    folder.mkdir(parents=True)
    state = {"step": 2, "model_config": config_signature(config), "recipe": training_recipe(args)}
    (folder / STATE_FILE).write_text(json.dumps(state))
    assert resolve_resume(args, config, tok) == str(folder)
    for other in (
        DFMConfig.from_preset("tiny", tokenizer=tok, block_size=8),
        DFMConfig.from_preset("tiny", tokenizer=tok),
    ):
        with pytest.raises(ValueError, match=r"differs in \['block_size'\]"):
            resolve_resume(args, other, tok)


def test_train_step_of_a_block_model_reports_the_block_diffusion_loss():
    from accelerate import Accelerator

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = DFMConfig.from_preset("tiny", tokenizer=tok, block_size=4, logits_shift=True)
    model = DFMForMaskedGeneration(config)
    args = parsed("--train_batch_size", "2", "--seq_len", "16", "--warmup_steps", "0", "--lr_scheduler", "constant",
                  "--coupling", "prefix", "--complementary_masks", "--loss_weighting", "inverse_t")  # fmt: skip
    scheduler = DiscreteFlowScheduler(mask_token_id=tok.mask_token_id, vocab_size=len(tok))
    collator = make_collator(scheduler, args, tok, return_clean_ids=True)
    rows = torch.randint(3, len(tok), (8, 16), generator=torch.Generator().manual_seed(1))
    plan = BatchPlan(8, 2, 1, 1, args.seed)
    batch, _ = draw_micro_batch(collator, plan, rows, 0, 0, 0, args.seed)
    assert batch["input_ids"].shape == (4, 16) and "clean_ids" in batch  # 2 rows + their complements
    with torch.no_grad():
        logits = block_diffusion_logits(model, batch, 4)
        expected = batch_loss(logits, batch, "ce", "inverse_t").item()
    accelerator = Accelerator(cpu=True)
    optimizer, lr_sched = make_optimizer(model.parameters(), args, 1)
    model, optimizer, lr_sched = accelerator.prepare(model, optimizer, lr_sched)
    assert train_step(accelerator, model, optimizer, lr_sched, collator, plan, rows, 0, args) == pytest.approx(
        expected, rel=1e-5
    )
    metrics = evaluate_model(model, rows, scheduler, argparse.Namespace(train_batch_size=4, eval_batches=2,
                                                                         num_samples=0, seq_len=16), tok)  # fmt: skip
    assert metrics["val_loss"] > 0 and metrics["elbo_per_token"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# A converted causal LM trained as a block-diffusion model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal(tmp_path_factory) -> str:
    """A tiny random Llama causal LM (tied embeddings, GQA) saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("causal") / "llama"
    ch.llama_source(tied=True, seed=11).save_pretrained(folder)
    ch.tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("block-data")
    train = root / "train"
    train.mkdir()
    for f in glob.glob(os.path.join(STDLIB, "json", "*.py")):
        shutil.copy(f, train / os.path.basename(f))
    val = root / "val.py"
    shutil.copy(os.path.join(STDLIB, "email", "iterators.py"), val)
    return {"train": str(train), "val": str(val)}


def block_args(causal: str, data: dict[str, str], out: str, *extra: str) -> list[str]:
    return [
        "--init_from_causal_lm", causal, "--mask_token", MASK, "--train_file", data["train"],
        "--validation_file", data["val"], "--seq_len", "32", "--train_batch_size", "4", "--learning_rate", "3e-3",
        "--warmup_steps", "1", "--logging_steps", "1", "--eval_steps", "1000", "--eval_batches", "4",
        "--num_samples", "0", "--no_progress", "--seed", "5", "--block_size", "4", "--loss_weighting", "inverse_t",
        "--output_dir", out, *extra,
    ]  # fmt: skip


def test_a_converted_causal_lm_trains_as_a_block_model_resumes_and_its_loss_falls(causal, data, tmp_path):
    ref = str(tmp_path / "ref")
    final = main(block_args(causal, data, ref, "--max_train_steps", "32", "--checkpointing_steps", "16"))
    records = read_log(ref)
    assert [r for r in records if r.get("event") == "start"][0]["block_size"] == 4
    curve = losses(records)
    early, late = sum(curve[s] for s in range(1, 5)) / 4, sum(curve[s] for s in range(29, 33)) / 4
    assert late < early - 0.3, (early, late)

    base = DFMPipeline.from_causal_lm(causal, mask_token=MASK)
    base.model.config.block_size = 4  # the untrained conversion, scored on the same objective
    probe = argparse.Namespace(train_batch_size=4, eval_batches=4, num_samples=0, seq_len=32)
    ids = base.tokenizer(open(data["val"], encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    rows = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    before = evaluate_model(base.model, rows, base.scheduler, probe, base.tokenizer)["val_loss"]
    assert final["val_loss"] < before - 0.3, (before, final["val_loss"])

    pipe = DFMPipeline.from_pretrained(ref)
    assert pipe.model.config.block_size == 4 and pipe.model.config.logits_shift
    assert evaluate_model(pipe.model, rows, pipe.scheduler, probe, pipe.tokenizer)["val_loss"] == pytest.approx(
        final["val_loss"], rel=1e-4
    )

    # a run killed after checkpoint-16 resumes with the losses of the uninterrupted run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(
        os.path.join(ref, "checkpoints", "checkpoint-16"), os.path.join(resumed, "checkpoints", "checkpoint-16")
    )
    main(block_args(causal, data, resumed, "--max_train_steps", "32", "--checkpointing_steps", "16",
                    "--resume_from_checkpoint", "latest"))  # fmt: skip
    again = losses(read_log(resumed))
    assert sorted(again) == list(range(17, 33))
    for step, value in again.items():
        assert value == pytest.approx(curve[step], rel=1e-5, abs=1e-6)
    # the block size is part of the checkpoint's model config
    with pytest.raises(ValueError, match=r"differs in \['block_size'\]"):
        main(block_args(causal, data, resumed, "--max_train_steps", "33", "--resume_from_checkpoint", "latest",
                        "--block_size", "8"))  # fmt: skip


def test_lora_block_training_ships_an_adapter_that_rebuilds_the_block_model(causal, data, tmp_path):
    out = str(tmp_path / "lora")
    flags = ("--max_train_steps", "3", "--checkpointing_steps", "100", "--lora_r", "4", "--complementary_masks")
    final = main(block_args(causal, data, out, *flags))
    assert final["train_loss"] > 0
    adapter = os.path.join(out, ADAPTER_SUBFOLDER)
    with open(os.path.join(adapter, BASE_RECIPE_FILE), encoding="utf-8") as f:
        assert json.load(f)["block_size"] == 4
    shipped = load_adapted_pipeline(adapter)
    merged = DFMPipeline.from_pretrained(out)
    assert shipped.model.config.block_size == merged.model.config.block_size == 4
    ids = torch.tensor([[5, 6, 384, 384, 9, 384, 12, 13, 384]])
    with torch.no_grad():
        torch.testing.assert_close(shipped.model(ids).logits, merged.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_finetune_script_trains_a_block_adapter_on_sft_data(tmp_path):
    base = str(tmp_path / "base")
    tiny_pipeline(seed=0).save_pretrained(base)
    rows = [{"prompt": f"# item {i}\n", "completion": f"x{i % 7} = {i % 5} + {i % 3}\n"} for i in range(64)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "adapter")
    final = lora_main([
        "--pretrained_model_name_or_path", base, "--sft", "--train_file", str(data), "--validation_file", str(data),
        "--seq_len", "32", "--train_batch_size", "4", "--max_train_steps", "3", "--warmup_steps", "1",
        "--lora_r", "4", "--eval_steps", "1000", "--eval_batches", "2", "--num_samples", "0", "--no_progress",
        "--block_size", "4", "--complementary_masks", "--merge", "--output_dir", out,
    ])  # fmt: skip
    assert final["val_loss"] > 0 and final["base_val_loss"] > 0
    merged = DFMPipeline.from_pretrained(os.path.join(out, "merged"))
    assert merged.model.config.block_size == 4
    assert DFMPipeline.from_pretrained(base).model.config.block_size is None  # the base folder is untouched
    with pytest.raises(ValueError, match="--block_size"):
        lora_main(["--pretrained_model_name_or_path", base, "--train_file", str(data), "--seq_len", "32",
                   "--block_size", "64", "--output_dir", str(tmp_path / "never")])  # fmt: skip
    assert not (tmp_path / "never").exists()


def test_a_block_base_keeps_its_block_size_and_refuses_annealing(data, tmp_path):
    base = str(tmp_path / "base")
    pipe = tiny_pipeline(seed=0)
    pipe.model.config.block_size = 8
    pipe.save_pretrained(base)
    common = ["--init_from_pretrained", base, "--train_file", data["train"], "--seq_len", "32", "--no_progress",
              "--train_batch_size", "2", "--max_train_steps", "1", "--num_samples", "0"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--attention_annealing_steps.*block_size=8"):
        main([*common, "--attention_annealing_steps", "4", "--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    main([*common, "--output_dir", str(tmp_path / "out")])
    start = [r for r in read_log(str(tmp_path / "out")) if r.get("event") == "start"][0]
    assert start["block_size"] == 8 and DFMPipeline.from_pretrained(str(tmp_path / "out")).model.config.block_size == 8
