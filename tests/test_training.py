"""Training: each module of ``dfm_hf.training`` on its own (fast), then train.py end to end on real stdlib sources
(slow): learning, a real 2-process gloo group, kill + resume, bad input.

Every run is tiny (hidden 64, 2 layers, vocab 384, 32-token rows) and single-threaded: on a busy 2-core machine torch's
default thread pool spins against other processes and makes each step ~100x slower.

Distributed runs go through ``python -m torch.distributed.run`` (torchrun). On a CPU-only machine
``accelerate launch --num_processes 2`` (with or without ``--cpu``) starts ONE process; torchrun (or
``accelerate launch --multi_gpu``) starts two, and they form one gloo group because train.py builds
``Accelerator(cpu=True)`` when no GPU is present. The tests check the group size from the run's own log.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import STDLIB, tiny_pipeline, tiny_tokenizer
from run_logs import losses, read_log
from safetensors.torch import load_file

from dfm_hf.models import DFM_PRESETS, DFMConfig, DFMForMaskedGeneration
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.schedulers import DiscreteFlowScheduler
from dfm_hf.training.adapters import (
    DEFAULT_MASK_TOKEN,
    EMBEDDING_ROWS_FILE,
    LORA_TARGET_MODULES,
    base_recipe,
    check_lora_targets,
    init_source,
    save_embedding_rows,
    write_embedding_rows,
)
from dfm_hf.training.arguments import (
    DEFAULT_MODEL_CONFIG,
    DEFAULT_TOKENIZER_VOCAB_SIZE,
    TOKEN_ID_KEYS,
    build_parser,
    validate_args,
    validate_lora_args,
)
from dfm_hf.training.batches import (
    BatchPlan,
    StreamedRows,
    annealing_seed,
    collator_seed,
    draw_micro_batch,
    make_collator,
)
from dfm_hf.training.checkpoints import (
    STATE_FILE,
    checkpoint_dirs,
    config_signature,
    read_checkpoint_step,
    resolve_resume,
    save_checkpoint,
    tokenizer_fingerprint,
    training_recipe,
)
from dfm_hf.training.collator import DFMDataCollator
from dfm_hf.training.losses import LOSS_TYPES, batch_loss
from dfm_hf.training.train import evaluate_model, main, make_logger, make_optimizer, run_record, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train_dfm.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def tiny_args(data: str, out: str, *extra: str) -> list[str]:
    """Flags of a tiny run on ``data``; ``extra`` flags come last (argparse: the last value wins)."""
    return [
        "--train_file", data, "--model_config", "tiny", "--tokenizer_vocab_size", "384", "--seq_len", "32",
        "--train_batch_size", "4", "--learning_rate", "3e-3", "--warmup_steps", "1", "--logging_steps", "1",
        "--eval_steps", "1000", "--eval_batches", "2", "--num_samples", "0", "--num_workers", "1", "--no_progress",
        "--seed", "3", "--output_dir", out, *extra,
    ]  # fmt: skip


def starts(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("event") == "start"]


def final_weights(out: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "model", "model.safetensors"))


def run_script(argv: list[str], launcher: list[str] | None = None, timeout: float = 300) -> None:
    cmd = (launcher or [sys.executable]) + argv
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def snapshot(path: str) -> dict[str, tuple[int, int]]:
    """Every file below ``path`` with its size and mtime (empty when ``path`` does not exist)."""
    out = {}
    for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) + glob.glob(os.path.join(path, "**", ".*")):
        st = os.stat(f)
        out[os.path.relpath(f, path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Real Python sources: ``json/*.py`` to train on, two ``email`` modules held out."""
    root = tmp_path_factory.mktemp("data")
    train, val = root / "train", root / "val"
    train.mkdir()
    val.mkdir()
    for f in glob.glob(os.path.join(STDLIB, "json", "*.py")):
        shutil.copy(f, train / os.path.basename(f))
    for name in ("encoders.py", "iterators.py"):
        shutil.copy(os.path.join(STDLIB, "email", name), val / name)
    return {"train": str(train), "val": str(val)}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> str:
    """One process, accumulation 2, 6 steps, a checkpoint every 2 steps: the run the others must reproduce."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    run_script([SCRIPT, *tiny_args(data["train"], out, "--gradient_accumulation_steps", "2",
                                   "--max_train_steps", "6", "--checkpointing_steps", "2")])  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Fast: each training module on its own (no training run, nothing written outside tmp_path)
# ---------------------------------------------------------------------------------------------------------------------


def parsed(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["--stdlib", "--output_dir", "never-written", *argv])
    validate_args(args)
    return args


def test_arguments_defaults_and_derived_values():
    args = parsed()
    assert (args.model_config, args.tokenizer_vocab_size) == (DEFAULT_MODEL_CONFIG, DEFAULT_TOKENIZER_VOCAB_SIZE)
    assert args.loss == "ce" and args.loss_weighting == "none" and args.coupling_spec == "unconditional"
    assert args.model_config_fields["num_hidden_layers"] == DFM_PRESETS["tiny"]["num_hidden_layers"]
    assert not set(args.model_config_fields) & set(TOKEN_ID_KEYS)  # the ids come from the tokenizer
    assert "loss_type" not in args.model_config_fields  # the loss is the training code's choice
    mixed = parsed("--coupling", "prefix:0.25,infill", "--loss", "generalized_kl", "--model_config_overrides",
                   '{"num_hidden_layers": 3}')  # fmt: skip
    assert mixed.coupling_spec == {"prefix": 0.25, "infill": 1.0} and mixed.loss == "generalized_kl"
    assert mixed.model_config_fields["num_hidden_layers"] == 3
    assert not os.path.exists("never-written")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--coupling", "prefix:-1"], "--coupling"),
        (["--coupling", "suffix"], "--coupling"),
        (["--loss", "generalized_kl", "--loss_weighting", "inverse_t"], "--loss_weighting"),
        (["--lora_r", "4"], "--lora_r"),
        (["--mask_token", "<m>"], "--mask_token"),
        (["--model_config", "huge"], "--model_config"),
        (["--sft"], "--sft"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--resume_from_checkpoint", "/no/such/ckpt"], "--resume_from_checkpoint"),
    ],
)
def test_arguments_bad_flags_are_named(argv, flag):
    with pytest.raises(ValueError, match=flag):
        parsed(*argv)


def test_block_diffusion_flags_are_shared_and_reach_the_collator():
    from dfm_hf.training.lora_finetune import build_parser as lora_parser

    for parser in (build_parser(), lora_parser()):
        assert {"--block_size", "--complementary_masks"} <= set(parser._option_string_actions)
    tok = tiny_tokenizer()
    scheduler = DiscreteFlowScheduler(mask_token_id=tok.mask_token_id, vocab_size=len(tok))
    rows = torch.randint(3, len(tok), (3, 16), generator=torch.Generator().manual_seed(0))
    plain = make_collator(scheduler, parsed(), tok)
    assert not plain.complementary_masks and "clean_ids" not in plain(rows)
    paired = make_collator(scheduler, parsed("--complementary_masks"), tok, return_clean_ids=True)
    batch = paired(rows)
    assert batch["input_ids"].shape == (6, 16) and torch.equal(batch["clean_ids"][::2], rows)
    assert ((batch["labels"][::2] != -100) ^ (batch["labels"][1::2] != -100)).all()  # unconditional: all once
    assert parsed("--block_size", "4").model_config_fields["block_size"] == 4
    with pytest.raises(ValueError, match="--block_size"):
        parsed("--block_size", "0")


def test_lora_arguments_default_alpha_and_targets():
    args = build_parser().parse_args(["--stdlib", "--output_dir", "o", "--lora_r", "4", "--init_from_pretrained", "x"])
    validate_lora_args(args)
    assert args.lora_alpha == 8.0 and args.lora_target_modules_list == list(LORA_TARGET_MODULES)


def test_batch_plan_splits_one_global_batch_over_processes_and_covers_each_epoch():
    one = BatchPlan(num_rows=10, batch_size=2, accumulation=2, world=1, seed=4)
    two = BatchPlan(num_rows=10, batch_size=2, accumulation=1, world=2, seed=4)
    for step in range(6):  # the same rows in the same order: (micro 0, micro 1) of one = (rank 0, rank 1) of two
        assert one.rows(step, 0, 0) + one.rows(step, 1, 0) == two.rows(step, 0, 0) + two.rows(step, 0, 1)
    epoch = [r for step in range(5) for m in range(2) for r in one.rows(step, m, 0)][:10]
    assert sorted(epoch) == list(range(10))  # every row once per epoch
    assert BatchPlan(10, 2, 2, 1, seed=5).rows(0, 0, 0) + BatchPlan(10, 2, 2, 1, seed=5).rows(0, 1, 0) != epoch[:4]
    assert BatchPlan(None, 3, 1, 2, seed=0).rows(2, 0, 1) == [15, 16, 17]  # a stream: positions in stream order


def test_streamed_rows_are_read_lazily_in_stream_order_and_restart(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[i, i] for i in range(5)]}).to_iterable_dataset()
    rows = StreamedRows(ds, seed=0, buffer_size=1)  # buffer 1: the stream order is the data's
    assert rows[[0, 1, 2]].tolist() == [[0, 0], [1, 1], [2, 2]]
    assert rows[[4, 5]].tolist() == [[4, 4], [0, 0]]  # epoch 2 restarts the stream
    assert rows[[1]].tolist() == [[1, 1]]  # an earlier position: read again from the start
    with pytest.raises(TypeError, match="no length"):
        len(rows)


def test_micro_batches_are_a_pure_function_of_their_index():
    tok = tiny_tokenizer()
    collator = DFMDataCollator(source_distribution="mask", mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                               coupling={"prefix": 1, "infill": 1}, pad_token_id=0)  # fmt: skip
    rows = torch.randint(3, len(tok), (12, 16), generator=torch.Generator().manual_seed(0))
    plan = BatchPlan(12, 2, 2, 1, seed=3)
    a, mask_a = draw_micro_batch(collator, plan, rows, 4, 1, 0, seed=3, visible_fraction=0.5)
    draw_micro_batch(collator, plan, rows, 0, 0, 0, seed=3)  # another draw in between changes nothing
    b, mask_b = draw_micro_batch(collator, plan, rows, 4, 1, 0, seed=3, visible_fraction=0.5)
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(mask_a, mask_b)
    assert mask_a.shape == (2, 1, 16, 16)  # annealing: a 4-d mask; bidirectional: the padding mask
    assert draw_micro_batch(collator, plan, rows, 4, 1, 0, seed=3)[1].shape == (2, 16)
    c, _ = draw_micro_batch(collator, plan, rows, 4, 1, 0, seed=4)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert annealing_seed(3, 7) != collator_seed(3, 7)


def test_batch_loss_is_the_chosen_loss_of_the_scored_tokens():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[-100, 4, 5, -100], [6, -100, -100, 7]])
    batch = {
        "labels": labels,
        "input_ids": torch.tensor([[1, 9, 9, 2], [9, 3, 3, 9]]),
        "kappa_rate": torch.tensor([2.0, 5.0]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "condition_mask": torch.tensor([[True, False, False, False], [False] * 4]),
    }
    logits = torch.randn(4, 10, generator=g)  # the 4 scored positions, row-major
    x1, rate = torch.tensor([4, 5, 6, 7]), torch.tensor([2.0, 2.0, 5.0, 5.0])
    log_p = torch.log_softmax(logits, -1)
    ce = -log_p[torch.arange(4), x1]
    torch.testing.assert_close(batch_loss(logits, batch, "ce"), ce.mean())
    p_mask = log_p[:, 9].exp()  # x_t is the mask (id 9) at every scored position
    torch.testing.assert_close(batch_loss(logits, batch, "generalized_kl"), (rate * (ce - p_mask)).mean())
    torch.testing.assert_close(batch_loss(logits, batch, "ce", "inverse_t"), (rate * ce).sum() / 6)  # 6 corruptible
    for kwargs, name in [({"loss": "mse"}, "`loss`"), ({"weighting": "t"}, "`weighting`"),
                         ({"loss": "generalized_kl", "weighting": "inverse_t"}, "`loss` 'ce'")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            batch_loss(logits, batch, **kwargs)
    assert set(LOSS_TYPES) == set(build_parser()._option_string_actions["--loss"].choices)


def test_checkpoints_resolve_only_complete_matching_ones(tmp_path):
    tok = tiny_tokenizer()
    config = DFMConfig.from_preset("tiny", tokenizer=tok)
    args = parsed("--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest")
    root = tmp_path / "checkpoints"
    for step in (2, 10, 4):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        state = {"step": step, "model_config": config_signature(config), "recipe": training_recipe(args),
                 "tokenizer_sha256": tokenizer_fingerprint(tok)}  # fmt: skip
        (root / f"checkpoint-{step}" / STATE_FILE).write_text(json.dumps(state))
    (root / "checkpoint-12").mkdir()  # incomplete: no state file
    (root / ".tmp-checkpoint-14").mkdir()
    assert [os.path.basename(d) for d in checkpoint_dirs(str(tmp_path))] == ["checkpoint-2", "checkpoint-4",
                                                                             "checkpoint-10"]  # fmt: skip
    latest = resolve_resume(args, config, tok)
    assert os.path.basename(latest) == "checkpoint-10" and read_checkpoint_step(latest) == 10
    annealed = parsed("--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest",
                      "--loss_weighting", "inverse_t")  # fmt: skip
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint.*--loss_weighting='none'"):
        resolve_resume(annealed, config, tok)
    other = DFMConfig.from_preset("tiny", tokenizer=tok, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"different model config \(differs in \['num_hidden_layers'\]\)"):
        resolve_resume(args, other, tok)
    with pytest.raises(ValueError, match="different tokenizer vocabulary"):
        resolve_resume(args, config, tiny_tokenizer(300))
    assert resolve_resume(parsed("--output_dir", str(tmp_path / "fresh"), "--resume_from_checkpoint", "latest"),
                          config, tok) is None  # fmt: skip


def test_save_checkpoint_renames_into_place_and_keeps_the_limit(tmp_path, one_thread):
    from accelerate import Accelerator

    tok = tiny_tokenizer()
    model = DFMForMaskedGeneration(DFMConfig.from_preset("tiny", tokenizer=tok))
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    args = parsed("--output_dir", str(tmp_path), "--checkpoints_total_limit", "2")
    for step in (1, 2, 3):
        save_checkpoint(accelerator, args, step, model.config, tok)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-3" / STATE_FILE).read_text())
    assert state["step"] == 3 and state["tokenizer_sha256"] == tokenizer_fingerprint(tok)
    assert state["recipe"] == training_recipe(args)


def test_embedding_rows_round_trip_and_are_checked(tmp_path):
    tok = tiny_tokenizer()
    model = DFMForMaskedGeneration(DFMConfig.from_preset("tiny", tokenizer=tok, tie_word_embeddings=False))
    rows = torch.randn(2, model.config.hidden_size)
    head = torch.randn(2, model.config.hidden_size)
    path = str(tmp_path / EMBEDDING_ROWS_FILE)
    save_embedding_rows(path, [5, 7], rows, head)
    from safetensors.torch import load_file

    tensors = load_file(path)
    write_embedding_rows(model, tensors, str(tmp_path))
    torch.testing.assert_close(model.model.embed_tokens.weight[[5, 7]].detach(), rows)
    torch.testing.assert_close(model.lm_head.weight[[5, 7]].detach(), head)
    for bad, message in [
        ({**tensors, "token_ids": torch.tensor([5, 10_000])}, "do not fit"),
        ({**tensors, "model.norm.weight": rows[0]}, "have no place in the model"),
        ({"token_ids": tensors["token_ids"]}, "lacks `model.embed_tokens.weight`"),
        ({k: v for k, v in tensors.items() if k != "token_ids"}, "1-d `token_ids`"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_embedding_rows(model, bad, str(tmp_path))
    with pytest.raises(ValueError, match="`--lora_target_modules` \\['qkv'\\] are not linear layers"):
        check_lora_targets(model, ["q_proj", "qkv"])


def test_base_recipe_and_init_source():
    args = argparse.Namespace(init_from_causal_lm="m", init_from_pretrained=None, gguf_file=None, mask_token=None,
                              mask_token_id=None)  # fmt: skip
    assert init_source(args) == ("--init_from_causal_lm", "m")
    assert base_recipe(args) == {"init_from_causal_lm": "m", "gguf_file": None, "mask_token": DEFAULT_MASK_TOKEN,
                                 "mask_token_id": None}  # fmt: skip
    args.mask_token_id = 3  # an existing token is the mask: no new token string
    assert base_recipe(args)["mask_token"] is None
    assert base_recipe(argparse.Namespace(init_from_causal_lm=None, init_from_pretrained="p")) == {
        "init_from_pretrained": "p"
    }
    assert init_source(argparse.Namespace(init_from_causal_lm=None, init_from_pretrained=None)) is None


def test_train_step_reports_the_planned_batch_loss_and_updates_the_weights(one_thread):
    from accelerate import Accelerator

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = DFMForMaskedGeneration(DFMConfig.from_preset("tiny", tokenizer=tok))
    args = parsed("--loss", "generalized_kl", "--gradient_accumulation_steps", "2", "--train_batch_size", "2",
                  "--seq_len", "16", "--warmup_steps", "0", "--lr_scheduler", "constant")  # fmt: skip
    scheduler = DiscreteFlowScheduler(mask_token_id=tok.mask_token_id, vocab_size=len(tok))
    collator = make_collator(scheduler, args, tok)
    rows = torch.randint(3, len(tok), (8, 16), generator=torch.Generator().manual_seed(1))
    plan = BatchPlan(8, 2, 2, 1, args.seed)
    with torch.no_grad():  # the losses of step 0's two micro-batches, at the initial weights
        expected = []
        for micro in range(2):
            batch, attention = draw_micro_batch(collator, plan, rows, 0, micro, 0, args.seed)
            scored = batch["labels"] != -100
            logits = model(batch["input_ids"], attention_mask=attention, timesteps=batch["timesteps"],
                           logits_to_keep=scored).logits  # fmt: skip
            expected.append(batch_loss(logits, batch, "generalized_kl").item())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer, lr_sched = make_optimizer(model.parameters(), args, 1)
    model, optimizer, lr_sched = accelerator.prepare(model, optimizer, lr_sched)
    loss = train_step(accelerator, model, optimizer, lr_sched, collator, plan, rows, 0, args)
    # both micro-batches run at the initial weights: the optimizer steps once, after the second
    assert loss == pytest.approx(sum(expected) / 2, rel=1e-5) and loss > 0
    changed = [k for k, v in accelerator.unwrap_model(model).state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the optimizer step changed no weight"


def test_evaluate_model_reports_ce_and_the_elbo_bound(one_thread):
    pipe = tiny_pipeline(seed=0)
    rows = torch.randint(3, len(pipe.tokenizer), (6, 16), generator=torch.Generator().manual_seed(2))
    args = argparse.Namespace(train_batch_size=4, eval_batches=2, num_samples=1, seq_len=16)
    metrics = evaluate_model(pipe.model, rows, pipe.scheduler, args, pipe.tokenizer)
    assert metrics["val_loss"] > 0 and metrics["ppl_bound"] == pytest.approx(math.exp(metrics["elbo_per_token"]))
    assert len(metrics["samples"]) == 1 and isinstance(metrics["samples"][0], str)
    assert evaluate_model(pipe.model, rows, pipe.scheduler, args, pipe.tokenizer)["val_loss"] == metrics["val_loss"]


def test_run_record_and_logger(tmp_path):
    log = make_logger(str(tmp_path), enabled=True)
    log({"step": 1, "loss": 2.5})
    log({"step": 2, "loss": 2.0, "samples": ["x"]})
    assert read_log(str(tmp_path)) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0, "samples": ["x"]}]
    make_logger(str(tmp_path / "other"), enabled=False)({"step": 1})
    assert not (tmp_path / "other").exists()  # not the main process: nothing written
    accelerator = argparse.Namespace(num_processes=2, distributed_type="MULTI_CPU")
    args = argparse.Namespace(train_batch_size=4, gradient_accumulation_steps=3)
    record = run_record(accelerator, args, 5, resumed_from=None)
    assert record == {"step": 5, "event": "start", "num_processes": 2, "distributed_type": "MULTI_CPU",
                      "global_batch_size": 24, "resumed_from": None}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Learning and the saved pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_saves_a_pipeline_that_generates(data, tmp_path, one_thread):
    out = str(tmp_path / "out")
    final = main(
        tiny_args(data["train"], out, "--validation_file", data["val"], "--max_train_steps", "40",
                  "--train_batch_size", "8", "--checkpointing_steps", "1000", "--num_samples", "1")
    )  # fmt: skip
    records = read_log(out)
    curve = losses(records)
    assert sorted(curve) == list(range(1, 41))
    early, late = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(36, 41)) / 5
    assert late < early - 0.5, (early, late)
    evals = [r for r in records if "val_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 40 and evals[0]["ppl_bound"] > 1.0
    assert final["step"] == 40 and final["val_loss"] == evals[0]["val_loss"]
    assert starts(records)[0]["num_processes"] == 1

    pipe = DFMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model.config.vocab_size == len(pipe.tokenizer) and pipe.model.config.max_position_embeddings == 512
    result = pipe("def ", gen_length=24, num_inference_steps=12, generator=torch.Generator().manual_seed(0))
    assert result.texts[0].startswith("def ") and len(result.texts[0]) > len("def ")
    assert os.path.isfile(os.path.join(out, "README.md"))
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------------
# Two processes (a real gloo group) = one process with twice the accumulation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_accumulation(data, reference, tmp_path):
    out = str(tmp_path / "ddp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = tiny_args(data["train"], out, "--gradient_accumulation_steps", "1", "--max_train_steps", "6",
                     "--checkpointing_steps", "2")  # fmt: skip
    run_script([SCRIPT, *argv], launcher=torchrun)

    records, ref_records = read_log(out), read_log(reference)
    (start,) = starts(records)
    assert start["num_processes"] == 2 and start["distributed_type"].endswith("MULTI_CPU")
    assert start["global_batch_size"] == starts(ref_records)[0]["global_batch_size"] == 8
    assert starts(ref_records)[0]["num_processes"] == 1
    # each rank wrote its own RNG state: two processes really took part
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "checkpoint-6"))) == sorted(
        os.listdir(os.path.join(reference, "checkpoints", "checkpoint-6")) + ["random_states_1.pkl"]
    )

    ddp, ref = losses(records), losses(ref_records)
    assert sorted(ddp) == sorted(ref) == list(range(1, 7))
    # bit-identical: the same micro-batches, and (g1 + g2) / 2 == g1 / 2 + g2 / 2 exactly in floating point
    assert ddp == ref
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs == {r["step"]: r["lr"] for r in ref_records if "lr" in r}  # one schedule step per step
    a, b = final_weights(out), final_weights(reference)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any(not torch.equal(a[k], load_file(os.path.join(reference, "checkpoints", "checkpoint-4",
                                                            "model.safetensors"))[k]) for k in a)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Kill after a checkpoint, resume
# ---------------------------------------------------------------------------------------------------------------------

# SIGKILLs itself while checkpoint-6 is being written: after accelerate's save_state into the temporary folder and
# before train.py renames it (the worst moment: a temp folder holding a full-looking state, plus checkpoint-4).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import accelerate
    from dfm_hf.training.train import main

    save_state = accelerate.Accelerator.save_state

    def save_state_then_die(self, output_dir=None, **kwargs):
        result = save_state(self, output_dir, **kwargs)
        if os.path.basename(output_dir) == ".tmp-checkpoint-6":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    accelerate.Accelerator.save_state = save_state_then_die
    main(sys.argv[1:])
    """
)


@pytest.mark.slow
def test_killed_run_resumes_from_the_last_complete_checkpoint_and_matches(data, reference, tmp_path):
    out = str(tmp_path / "killed")
    argv = tiny_args(data["train"], out, "--gradient_accumulation_steps", "2", "--max_train_steps", "6",
                     "--checkpointing_steps", "2")  # fmt: skip
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(killer), *argv], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(ckpts)) == [".tmp-checkpoint-6", "checkpoint-2", "checkpoint-4"]
    assert not os.path.exists(os.path.join(out, "model_index.json"))
    # make the half-written folder look as complete as it can: it still must not be loaded
    with open(os.path.join(ckpts, "checkpoint-4", "training_state.json"), encoding="utf-8") as f:
        state = {**json.load(f), "step": 6}
    with open(os.path.join(ckpts, ".tmp-checkpoint-6", "training_state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f)
    with pytest.raises(ValueError, match="--resume_from_checkpoint"):
        main([*argv, "--resume_from_checkpoint", os.path.join(ckpts, ".tmp-checkpoint-6")])

    run_script([SCRIPT, *argv, "--resume_from_checkpoint", "latest"])

    records = read_log(out)
    first, second = starts(records)
    assert first["resumed_from"] is None and second["step"] == 4
    assert os.path.basename(second["resumed_from"]) == "checkpoint-4"
    resumed = losses(records[records.index(second) :])
    assert sorted(resumed) == [5, 6]
    ref = losses(read_log(reference))
    assert resumed == {5: ref[5], 6: ref[6]} and losses(records) == ref  # bit-identical to the uninterrupted run
    a, b = final_weights(out), final_weights(reference)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert sorted(os.listdir(ckpts)) == ["checkpoint-4", "checkpoint-6"]  # temp folder replaced, limit 2 kept


@pytest.mark.slow
def test_resuming_a_finished_run_saves_it_again(reference, data, tmp_path, one_thread):
    out = str(tmp_path / "done")
    shutil.copytree(os.path.join(reference, "checkpoints"), os.path.join(out, "checkpoints"))
    argv = tiny_args(data["train"], out, "--gradient_accumulation_steps", "2", "--max_train_steps", "6",
                     "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")  # fmt: skip
    final = main(argv)
    assert final["step"] == 6
    a, b = final_weights(out), final_weights(reference)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the flag, before anything is written
# ---------------------------------------------------------------------------------------------------------------------


def _no_mask_tokenizer(path: str) -> str:
    from transformers import PreTrainedTokenizerFast

    tok = tiny_tokenizer()
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token,
                                    pad_token=tok.pad_token)  # fmt: skip
    assert plain.mask_token_id is None
    plain.save_pretrained(path)
    return path


def _other_config_checkpoint(reference: str, out: str) -> str:
    shutil.copytree(os.path.join(reference, "checkpoints", "checkpoint-6"), os.path.join(out, "checkpoints", "c-6"))
    return os.path.join(out, "checkpoints", "c-6")


def _bad_cases(data: dict[str, str], reference: str, tmp: str) -> dict[str, tuple[list[str], str]]:
    os.makedirs(os.path.join(tmp, "empty"))
    open(os.path.join(tmp, "empty", "a.py"), "w").close()
    with open(os.path.join(tmp, "short.py"), "w", encoding="utf-8") as f:
        f.write("x = 1\n")
    ckpt_out = os.path.join(tmp, "with_ckpt")
    shutil.copytree(os.path.join(reference, "checkpoints"), os.path.join(ckpt_out, "checkpoints"))
    latest = ["--resume_from_checkpoint", "latest", "--output_dir", ckpt_out]
    deeper = ["--model_config_overrides", '{"num_hidden_layers": 3}']
    return {
        "missing train file": (["--train_file", os.path.join(tmp, "nope.py")], "--train_file"),
        "empty train files": (["--train_file", os.path.join(tmp, "empty")], "--train_file"),
        "train data shorter than a row": (["--train_file", os.path.join(tmp, "short.py")], "--train_file"),
        "missing validation file": (["--validation_file", os.path.join(tmp, "nope.py")], "--validation_file"),
        "empty validation file": (["--validation_file", os.path.join(tmp, "empty", "a.py")], "--validation_file"),
        "tokenizer without mask": (
            ["--tokenizer_name_or_path", _no_mask_tokenizer(os.path.join(tmp, "tok"))],
            "--tokenizer_name_or_path",
        ),  # fmt: skip
        "seq_len above the preset's positions": (["--seq_len", "513"], "--seq_len"),
        "seq_len above overridden positions": (
            ["--model_config_overrides", '{"max_position_embeddings": 16}'],
            "--seq_len",
        ),  # fmt: skip
        "bad overrides": (["--model_config_overrides", "{num_hidden_layers: 3}"], "--model_config_overrides"),
        "checkpoint of another config": (
            [*deeper, "--resume_from_checkpoint", _other_config_checkpoint(reference, os.path.join(tmp, "other"))],
            "--resume_from_checkpoint",
        ),  # fmt: skip
        "latest checkpoint of another config": ([*deeper, *latest], "--resume_from_checkpoint"),
        "checkpoint of another tokenizer": (["--train_file", data["val"], *latest], "--resume_from_checkpoint"),
        "zero checkpoints kept": (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit"),
    }


@pytest.mark.slow
def test_bad_input_raises_before_anything_is_written(data, reference, tmp_path, one_thread):
    cases = _bad_cases(data, reference, str(tmp_path / "inputs"))
    for name, (extra, flag) in cases.items():
        out = str(tmp_path / "out" / name.replace(" ", "_"))
        argv = tiny_args(data["train"], out, "--max_train_steps", "2", *extra)
        target = argv[len(argv) - argv[::-1].index("--output_dir")]  # the last --output_dir given
        before = snapshot(target)
        with pytest.raises(ValueError, match=flag) as err:
            main(argv)
        assert snapshot(target) == before, f"{name}: {target} changed"
        assert os.path.exists(target) == bool(before), name
        print(f"{name}: {err.value}")


@pytest.mark.slow
def test_streaming_run_resumes_with_the_same_rows(tmp_path):
    """--streaming reads packed rows lazily; a resumed streaming run continues with the exact losses of an
    uninterrupted one (the stream position is a pure function of seed and step)."""
    data = tmp_path / "data"
    data.mkdir()
    for f in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "json", "*.py"))):
        shutil.copy(f, data)
    common = ["--train_file", str(data), "--streaming", "--seq_len", "32", "--train_batch_size", "4",
              "--model_config", "tiny", "--tokenizer_vocab_size", "300", "--checkpointing_steps", "3",
              "--logging_steps", "1", "--lr_scheduler", "constant", "--eval_steps", "100", "--no_progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, steps, *extra):
        cmd = [sys.executable, "examples/train_dfm.py", *common, "--output_dir", str(out), "--max_train_steps"]
        subprocess.run([*cmd, str(steps), *extra], check=True, env=env, capture_output=True, timeout=600, cwd=REPO)
        lines = [json.loads(x) for x in open(out / "logs" / "metrics.jsonl")]
        return {r["step"]: r["loss"] for r in lines if "loss" in r and "step" in r}

    full = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, "--resume_from_checkpoint", "latest")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert {step: resumed[step] for step in (4, 5, 6)} == {step: full[step] for step in (4, 5, 6)}  # exactly
