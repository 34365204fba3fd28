"""Adaptation training (issue 19, section 2): a tiny random causal LM converted by ``--init_from_causal_lm`` and
trained with DiffuLLaMA's attention annealing and the ``1/t``-weighted masked CE; resuming from a checkpoint gives the
losses of the uninterrupted run; LoRA saves a merged pipeline plus a shippable adapter (LoRA + the mask row); bf16
really autocasts on CPU. Everything is tiny (hidden 32, 2 layers, 32-token rows) and single-threaded."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from dfm_hf.bundles.build import main as build_bundle_main
from dfm_hf.bundles.materialize import base_from_folder, materialize_bundle
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.training.adapters import ADAPTER_SUBFOLDER, BASE_RECIPE_FILE, EMBEDDING_ROWS_FILE, load_adapted_pipeline
from dfm_hf.training.collator import annealed_attention_mask, annealing_visible_fraction
from dfm_hf.training.losses import inverse_t_cross_entropy_loss
from dfm_hf.training.train import evaluate_model, main

try:
    from . import conversion_helpers as ch
    from .run_logs import losses, read_log
except ImportError:
    import conversion_helpers as ch
    from run_logs import losses, read_log

MASK = "<|dfm_mask|>"  # a new token: id 384 of the 384-token test tokenizer (an unused row of the 392-row table)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def causal(tmp_path_factory) -> str:
    """A tiny random Llama causal LM (tied embeddings, GQA) saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("causal") / "llama"
    ch.llama_source(tied=True, seed=11).save_pretrained(folder)
    ch.tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapt-data")
    train = root / "train"
    train.mkdir()
    for f in glob.glob(os.path.join(ch.os.path.dirname(os.__file__), "json", "*.py")):
        shutil.copy(f, train / os.path.basename(f))
    val = root / "val.py"
    shutil.copy(os.path.join(os.path.dirname(os.__file__), "email", "iterators.py"), val)
    return {"train": str(train), "val": str(val)}


def adapt_args(causal: str, data: dict[str, str], out: str, *extra: str) -> list[str]:
    return [
        "--init_from_causal_lm", causal, "--mask_token", MASK, "--train_file", data["train"],
        "--validation_file", data["val"], "--seq_len", "32", "--train_batch_size", "4", "--learning_rate", "3e-3",
        "--warmup_steps", "1", "--logging_steps", "1", "--eval_steps", "1000", "--eval_batches", "4",
        "--num_samples", "0", "--no_progress", "--seed", "5", "--attention_annealing_steps", "4",
        "--loss_weighting", "inverse_t", "--output_dir", out, *extra,
    ]  # fmt: skip


def val_loss(model, tokenizer, scheduler, path: str) -> float:
    """Masked-token CE of ``model`` on ``path`` packed into 32-token rows (the training script's evaluation)."""
    ids = tokenizer(open(path, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    rows = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    args = types.SimpleNamespace(train_batch_size=4, eval_batches=4, num_samples=0, seq_len=32)
    return evaluate_model(model, rows, scheduler, args, tokenizer)["val_loss"]


# ---------------------------------------------------------------------------------------------------------------------
# The annealing schedule and the weighted loss, directly
# ---------------------------------------------------------------------------------------------------------------------


def test_annealing_is_causal_at_0_bidirectional_at_n_and_in_between_about_s_over_n():
    n = 10
    assert [annealing_visible_fraction(s, n) for s in (0, 3, 10, 25)] == [0.0, 0.3, 1.0, 1.0]
    assert annealing_visible_fraction(0, 0) == 1.0  # 0 = bidirectional at once
    padding = torch.ones(6, 48, dtype=torch.long)
    padding[1, 40:] = 0
    future = torch.ones(48, 48, dtype=torch.bool).triu(1)
    minimum = torch.finfo(torch.float32).min
    for s in (0, 3, 7, 10):
        visible = annealing_visible_fraction(s, n)
        mask = annealed_attention_mask(padding, visible, torch.Generator().manual_seed(s))
        assert mask.shape == (6, 1, 48, 48) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, minimum}
        sees = mask[:, 0] == 0
        assert sees[0][~future].all() and not sees[1, :, 40:].any()  # the past always, padding never
        share = sees[0][future].float().mean().item()  # the share of future keys a query sees
        assert abs(share - visible) < 0.03, (s, share)
    assert not (annealed_attention_mask(padding, 0.0)[0, 0] == 0)[future].any()  # step 0: exactly causal
    again = annealed_attention_mask(padding, 0.5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, annealed_attention_mask(padding, 0.5, torch.Generator().manual_seed(1)))


def test_inverse_t_loss_is_the_rate_weighted_ce_over_corruptible_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=gen)
    labels = torch.tensor([1, 4, -100, 7, 2])
    rate = torch.tensor([2.0, 2.0, 2.0, 10.0, 10.0])  # 1 / (1 - t) of each token's row: t = 0.5 and t = 0.9
    ce = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    expected = (2 * ce[0] + 2 * ce[1] + 10 * ce[3] + 10 * ce[4]) / 16
    torch.testing.assert_close(inverse_t_cross_entropy_loss(logits, labels, rate, torch.tensor(16)), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Full fine-tuning from a causal LM: the loss falls, a resumed run matches the uninterrupted one
# ---------------------------------------------------------------------------------------------------------------------


def test_adapting_a_causal_lm_lowers_the_loss_and_resumes_exactly(causal, data, tmp_path):
    ref = str(tmp_path / "ref")
    final = main(adapt_args(causal, data, ref, "--max_train_steps", "12", "--checkpointing_steps", "6"))
    records = read_log(ref)
    start = [r for r in records if r.get("event") == "start"][0]
    assert start["init_from"] == causal and start["trainable_parameters"] == start["total_parameters"]
    fractions = {r["step"]: r["attention_visible_fraction"] for r in records if "loss" in r}
    assert [fractions[s] for s in (1, 2, 3, 4, 5, 12)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]

    base = DFMPipeline.from_causal_lm(causal, mask_token=MASK)
    assert base.model.config.logits_shift and base.tokenizer.mask_token_id == 384
    before = val_loss(base.model, base.tokenizer, base.scheduler, data["val"])
    assert final["val_loss"] < before - 0.5, (before, final["val_loss"])

    pipe = DFMPipeline.from_pretrained(ref)  # the saved pipeline: the converted architecture and its tokenizer
    assert pipe.model.config.logits_shift and pipe.tokenizer.mask_token == MASK and len(pipe.tokenizer) == 385
    assert val_loss(pipe.model, pipe.tokenizer, pipe.scheduler, data["val"]) == pytest.approx(final["val_loss"])
    pipe.set_progress_bar_config(disable=True)
    text = pipe("def ", gen_length=8, num_inference_steps=8, generator=torch.Generator().manual_seed(0)).texts[0]
    assert text.startswith("def ")

    # a run killed after checkpoint-6 holds exactly that checkpoint: resume it, same losses, same weights
    resumed = str(tmp_path / "resumed")
    shutil.copytree(
        os.path.join(ref, "checkpoints", "checkpoint-6"), os.path.join(resumed, "checkpoints", "checkpoint-6")
    )
    main(adapt_args(causal, data, resumed, "--max_train_steps", "12", "--checkpointing_steps", "6",
                    "--resume_from_checkpoint", "latest"))  # fmt: skip
    again = losses(read_log(resumed))
    assert sorted(again) == list(range(7, 13))
    assert again == {s: losses(records)[s] for s in range(7, 13)}
    a, b = (
        load_file(os.path.join(ref, "model", "model.safetensors")),
        load_file(os.path.join(resumed, "model", "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the schedule is part of the resumable state: another annealing length is refused before anything is written
    with pytest.raises(ValueError, match="--attention_annealing_steps"):
        main(adapt_args(causal, data, resumed, "--max_train_steps", "12", "--resume_from_checkpoint", "latest",
                        "--attention_annealing_steps", "8"))  # fmt: skip


def test_annealing_and_gradient_checkpointing_change_what_they_should(causal, data, tmp_path):
    common = ("--max_train_steps", "3", "--checkpointing_steps", "100", "--eval_batches", "1")
    plain = losses(read_log(_run(causal, data, tmp_path / "a", *common)))
    ckpt = losses(read_log(_run(causal, data, tmp_path / "b", *common, "--gradient_checkpointing")))
    torch.testing.assert_close(torch.tensor(list(ckpt.values())), torch.tensor(list(plain.values())))
    bidirectional = losses(read_log(_run(causal, data, tmp_path / "c", *common, "--attention_annealing_steps", "0")))
    assert abs(bidirectional[1] - plain[1]) > 1e-3  # step 0: causal attention with annealing, bidirectional without


def _run(causal: str, data: dict[str, str], out, *extra: str) -> str:
    main(adapt_args(causal, data, str(out), *extra))
    return str(out)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA: merged pipeline + adapter folder (LoRA weights and the trained mask row)
# ---------------------------------------------------------------------------------------------------------------------


def test_lora_adaptation_saves_a_merged_pipeline_and_a_small_adapter_with_the_mask_row(causal, data, tmp_path):
    out = str(tmp_path / "lora")
    flags = ("--max_train_steps", "8", "--checkpointing_steps", "4", "--lora_r", "4", "--learning_rate", "1e-2")
    final = main(adapt_args(causal, data, out, *flags))
    start = [r for r in read_log(out) if r.get("event") == "start"][0]
    assert 0 < start["trainable_parameters"] < 0.2 * start["total_parameters"]

    adapter = os.path.join(out, ADAPTER_SUBFOLDER)
    assert final["adapter"] == adapter
    files = {"adapter_config.json", "adapter_model.safetensors", EMBEDDING_ROWS_FILE, BASE_RECIPE_FILE, "README.md"}
    assert files <= set(os.listdir(adapter))
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["trainable_token_indices"] is None
    lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert lora and all("lora_" in k for k in lora)
    rows = load_file(os.path.join(adapter, EMBEDDING_ROWS_FILE))
    assert rows["token_ids"].tolist() == [384] and rows["model.embed_tokens.weight"].shape == (1, 32)
    assert sum(t.numel() for t in lora.values()) + 32 == start["trainable_parameters"]  # LoRA + the mask row
    with open(os.path.join(adapter, BASE_RECIPE_FILE), encoding="utf-8") as f:
        recipe = json.load(f)
    assert recipe == {"init_from_causal_lm": causal, "gguf_file": None, "mask_token": MASK, "mask_token_id": None}

    # the mask row was trained (it is not the converted base's mean row any more)
    base = DFMPipeline.from_causal_lm(causal, mask_token=MASK)
    assert not torch.allclose(rows["model.embed_tokens.weight"][0], base.model.model.embed_tokens.weight[384])
    # the adapter folder alone (base rebuilt, rows written, LoRA loaded by pipe.load_lora_weights) = the merged pipeline
    shipped = load_adapted_pipeline(adapter)
    merged = DFMPipeline.from_pretrained(out)
    assert not any(
        "lora" in k or "token_adapter" in k for k in load_file(os.path.join(out, "model", "model.safetensors"))
    )
    ids = torch.tensor([[5, 6, 384, 384, 9, 384, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(shipped.model(ids).logits, merged.model(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base.model(ids).logits, merged.model(ids).logits, atol=1e-3)
    assert merged.model.lm_head.weight is merged.model.model.embed_tokens.weight  # still tied

    # the adapter folder ships as a default-model bundle (`python -m dfm_hf.bundles.build --adapter ...`): float16
    # LoRA weights, the run's scheduler at the chosen temperature, materialised onto the base = the merged pipeline
    bundle = str(tmp_path / "bundle")
    argv = ["--adapter", adapter, "--output", bundle, "--scheduler_from", out, "--temperature", "0.7"]
    assert build_bundle_main(argv + ["--name", "tiny"]) == 0
    stored = load_file(os.path.join(bundle, "adapter", "adapter_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    folder = materialize_bundle(bundle, base=base_from_folder(causal), cache_dir=str(tmp_path / "cache"))
    from_bundle = DFMPipeline.from_pretrained(folder)
    assert from_bundle.scheduler.config.temperature == 0.7
    assert set(from_bundle.scheduler_presets) >= set(merged.scheduler_presets)
    with torch.no_grad():
        torch.testing.assert_close(from_bundle.model(ids).logits, merged.model(ids).logits, rtol=1e-2, atol=1e-2)

    # a LoRA run resumed from its checkpoint-4 continues with the same losses and ends with the same adapter
    resumed = str(tmp_path / "resumed")
    shutil.copytree(
        os.path.join(out, "checkpoints", "checkpoint-4"), os.path.join(resumed, "checkpoints", "checkpoint-4")
    )
    main(adapt_args(causal, data, resumed, *flags, "--resume_from_checkpoint", "latest"))
    assert losses(read_log(resumed)) == {s: v for s, v in losses(read_log(out)).items() if s > 4}
    again = load_file(os.path.join(resumed, ADAPTER_SUBFOLDER, EMBEDDING_ROWS_FILE))
    assert torch.equal(again["model.embed_tokens.weight"], rows["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# bf16 autocast on CPU, and bad flags
# ---------------------------------------------------------------------------------------------------------------------

AUTOCAST_PROBE = """
import argparse, torch
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.training.train import make_accelerator
acc = make_accelerator(argparse.Namespace(mixed_precision="bf16", gradient_accumulation_steps=1))
model = acc.prepare(DFMForMaskedGeneration(DFMConfig.from_preset("tiny", vocab_size=64, mask_token_id=3)))
seen = []
model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
out = model(torch.randint(0, 64, (2, 8)))
print(acc.device.type, seen[0], out.logits.dtype, next(model.parameters()).dtype)
"""


@pytest.mark.slow
def test_bf16_mixed_precision_autocasts_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", AUTOCAST_PROBE], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the projections run in bf16, the weights stay float32 and the logits come back as float32
    assert proc.stdout.split() == ["cpu", "torch.bfloat16", "torch.float32", "torch.float32"]


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--model_config", "tiny"], "--model_config"),
        (["--tokenizer_vocab_size", "300"], "--tokenizer_vocab_size"),
        (["--attention_annealing_steps", "-1"], "--attention_annealing_steps"),
        (["--loss", "generalized_kl"], "--loss_weighting"),
        (["--lora_r", "4", "--lora_target_modules", "q_proj,qkv"], "--lora_target_modules"),
        (["--gguf_file", "nope.gguf"], "--gguf_file"),
        (["--seq_len", "65"], "--seq_len"),
        (["--init_from_causal_lm", "./no/such/folder"], "--init_from_causal_lm"),
        (["--init_from_pretrained", "./no/such/folder"], "--init_from_causal_lm"),  # at most one of the two
    ],
)
def test_bad_adaptation_flags_raise_before_anything_is_written(causal, data, tmp_path, extra, flag):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=flag):
        main(adapt_args(causal, data, str(out), "--max_train_steps", "1", *extra))
    assert not out.exists()


def test_mask_token_flags_need_a_causal_lm_and_lora_needs_a_pretrained_model(data, tmp_path):
    base = ["--train_file", data["train"], "--seq_len", "32", "--output_dir", str(tmp_path / "o"), "--no_progress"]
    with pytest.raises(ValueError, match="--mask_token_id"):
        main([*base, "--mask_token_id", "3"])
    with pytest.raises(ValueError, match="--lora_r"):
        main([*base, "--lora_r", "4"])
    assert not (tmp_path / "o").exists()
