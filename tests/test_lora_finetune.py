"""LoRA fine-tuning of a saved pipeline: it learns a distinctive corpus, the adapter is small, loads through
``DFMPipeline.load_lora_weights`` and changes outputs, and ``--merge`` saves a pipeline with the same logits."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import types

import pytest
import torch
from helpers import STDLIB, tiny_pipeline
from safetensors.torch import load_file

from dfm_hf.pipelines import DFMPipeline
from dfm_hf.training.adapters import LORA_TARGET_MODULES
from dfm_hf.training.lora_finetune import build_parser, load_base_pipeline, validate_args
from dfm_hf.training.lora_finetune import main as lora_main
from dfm_hf.training.train import evaluate_model
from dfm_hf.training.train import main as train_main


def peculiar_code(seed: int, n: int) -> str:
    """Many variations of one odd pattern made of common tokens (the base model knows the words, not the pattern)."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(n):
        a, b = rng.choice(["self", "obj", "value", "key"]), rng.choice(["None", "True", "False"])
        blocks.append(f"    if {a} is {b}:\n        return {a}.encode({b}) or {b}\n")
    return "\n".join(blocks)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A tiny pipeline trained for 100 steps on ``json/*.py``."""
    root = tmp_path_factory.mktemp("base")
    data = root / "data"
    data.mkdir()
    for f in glob.glob(os.path.join(STDLIB, "json", "*.py")):
        shutil.copy(f, data / os.path.basename(f))
    out = str(root / "pipe")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    train_main(["--train_file", str(data), "--model_config", "tiny", "--tokenizer_vocab_size", "384",
                "--seq_len", "32", "--train_batch_size", "8", "--max_train_steps", "100", "--warmup_steps", "2",
                "--learning_rate", "1e-2", "--checkpointing_steps", "1000", "--logging_steps", "5", "--no_progress",
                "--output_dir", out])  # fmt: skip
    torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.py").write_text(peculiar_code(0, 300))
    (root / "val.py").write_text(peculiar_code(1, 60))
    return {"train": str(root / "train.py"), "val": str(root / "val.py")}


def lora_args(base: str, corpus: dict[str, str], out: str, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", base, "--train_file", corpus["train"], "--validation_file", corpus["val"],
        "--seq_len", "32", "--train_batch_size", "8", "--max_train_steps", "40", "--learning_rate", "1e-2",
        "--warmup_steps", "2", "--lora_r", "4", "--lora_alpha", "8", "--eval_steps", "1000", "--eval_batches", "4",
        "--num_samples", "0", "--logging_steps", "5", "--no_progress", "--output_dir", out, *extra,
    ]  # fmt: skip


def val_loss(pipe: DFMPipeline, path: str) -> float:
    """Masked-token cross-entropy of ``pipe``'s model on ``path`` packed into 32-token rows (fixed corruption)."""
    ids = pipe.tokenizer(open(path, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    rows = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    args = types.SimpleNamespace(train_batch_size=8, eval_batches=4, num_samples=0, seq_len=32)
    return evaluate_model(pipe.model, rows, pipe.scheduler, args, pipe.tokenizer)["val_loss"]


def test_lora_learns_the_corpus_and_loads_merges_and_stays_small(base, corpus, tmp_path):
    out = str(tmp_path / "adapter")
    final = lora_main(lora_args(base, corpus, out, "--merge"))

    # the fine-tuned model fits the corpus better than the base model. The margin is modest because the tied
    # embeddings stay frozen (a full fine-tune of this tiny model gets ~1.7 nats lower, LoRA of any rank ~0.3)
    assert final["val_loss"] < final["base_val_loss"] - 0.2, final
    pipe = DFMPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    base_loss = val_loss(pipe, corpus["val"])
    assert base_loss == pytest.approx(final["base_val_loss"], rel=1e-5)

    # the adapter: peft's files, our card, a small fraction of the model
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(out))
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == base
    assert set(config["target_modules"]) == set(LORA_TARGET_MODULES)
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    adapter_size = sum(t.numel() for t in adapter.values())
    model_size = sum(p.numel() for p in pipe.model.parameters())
    assert adapter_size == final["trainable_parameters"] and 0 < adapter_size < 0.2 * model_size
    assert os.path.getsize(os.path.join(out, "adapter_model.safetensors")) < 0.2 * os.path.getsize(
        os.path.join(base, "model", "model.safetensors")
    )
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert f"base_model: {base}" in card and "load_lora_weights" in card

    # loading it changes the outputs and reproduces the fine-tuned loss
    ids = pipe.tokenizer("    if key is None:\n        return " + pipe.tokenizer.mask_token * 6, return_tensors="pt")
    base_logits = pipe.model(ids["input_ids"]).logits
    pipe.load_lora_weights(out, adapter_name="zorp")
    lora_logits = pipe.model(ids["input_ids"]).logits
    assert not torch.allclose(base_logits, lora_logits, atol=1e-3)
    assert val_loss(pipe, corpus["val"]) == pytest.approx(final["val_loss"], rel=1e-4)

    # --merge: a full pipeline whose logits equal base + adapter
    merged = DFMPipeline.from_pretrained(os.path.join(out, "merged"))
    merged_logits = merged.model(ids["input_ids"]).logits
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-4, atol=1e-4)
    assert type(merged.model).__name__ == "DFMForMaskedGeneration"
    assert not any("lora" in n for n in load_file(os.path.join(out, "merged", "model", "model.safetensors")))
    merged.set_progress_bar_config(disable=True)
    text = merged("    if self", gen_length=16, num_inference_steps=16, generator=torch.Generator().manual_seed(0))
    assert text.texts[0].startswith("    if self")


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--target_modules", "q_proj,qkv"], "--target_modules"),
        (["--seq_len", "600"], "--seq_len"),
        (["--lora_r", "0"], "--lora_r"),
        (["--lora_dropout", "1.0"], "--lora_dropout"),
        (["--train_file", "/nonexistent/data.py"], "--train_file"),
    ],
)
def test_bad_input_raises_before_anything_is_written(base, corpus, tmp_path, extra, flag):
    out = tmp_path / "adapter"
    with pytest.raises(ValueError, match=flag):
        lora_main(lora_args(base, corpus, str(out), *extra))
    assert not out.exists()


def test_missing_base_pipeline_is_a_clear_error(corpus, tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path"):
        lora_main(lora_args(str(tmp_path / "no_such_pipeline"), corpus, str(out)))
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--lora_r", "0"], "--lora_r"),
        (["--lora_alpha", "0"], "--lora_alpha"),
        (["--lora_dropout", "1.0"], "--lora_dropout"),
        (["--target_modules", " , "], "--target_modules"),
        (["--learning_rate", "-1"], "--learning_rate"),
    ],
)
def test_finetuning_flags_are_checked_before_the_base_is_loaded(extra, flag):
    args = build_parser().parse_args(["--pretrained_model_name_or_path", "x", "--stdlib", "--output_dir", "o", *extra])
    with pytest.raises(ValueError, match=flag):
        validate_args(args)


def test_base_pipeline_is_checked_against_the_flags(tmp_path):
    tiny_pipeline(seed=0).save_pretrained(str(tmp_path / "base"))
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "base"), "--stdlib", "--output_dir", "o"]
    args = build_parser().parse_args(argv)
    validate_args(args)
    assert args.target_modules_list == list(LORA_TARGET_MODULES)
    assert load_base_pipeline(args).model.config.vocab_size == len(load_base_pipeline(args).tokenizer)
    for extra, message in [
        (["--target_modules", "q_proj,qkv"], r"`--target_modules` \['qkv'\] are not linear layers"),
        (["--seq_len", "600"], "`--seq_len` 600 exceeds the base model's max_position_embeddings=512"),
    ]:
        args = build_parser().parse_args(argv + extra)
        validate_args(args)
        with pytest.raises(ValueError, match=message):
            load_base_pipeline(args)
