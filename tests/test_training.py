"""train.py end to end on real stdlib sources: learning, a real 2-process gloo group, kill + resume, bad input.

Every run is tiny (hidden 64, 2 layers, vocab 384, 32-token rows) and single-threaded: on a busy 2-core machine torch's
default thread pool spins against other processes and makes each step ~100x slower.

Distributed runs go through ``python -m torch.distributed.run`` (torchrun). On a CPU-only machine
``accelerate launch --num_processes 2`` (with or without ``--cpu``) starts ONE process; torchrun (or
``accelerate launch --multi_gpu``) starts two, and they form one gloo group because train.py builds
``Accelerator(cpu=True)`` when no GPU is present. The tests check the group size from the run's own log.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import STDLIB, tiny_tokenizer
from run_logs import losses, read_log
from safetensors.torch import load_file

from dfm_hf.pipelines import DFMPipeline
from dfm_hf.training.train import main

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
