"""Supervised fine-tuning data (issue 15, section 4): prompt/completion and chat ``messages`` rows, where the prompt
conditions (never corrupted, never scored) and the response plus its EOS is scored; LoRA fine-tuning of converted
LLaDA / Dream checkpoints whose adapter loads back with ``pipe.load_lora_weights``; full fine-tuning of a released
checkpoint with ``train_dfm.py --init_from_pretrained``. Tiny checkpoints from tests/conversion_helpers.py."""

from __future__ import annotations

import json
import os
import random
import types

import pytest
import torch

from dfm_hf.data.sft import load_sft_dataset, tokenize_sft
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler
from dfm_hf.training.adapters import LORA_TARGET_MODULES
from dfm_hf.training.collator import DFMDataCollator
from dfm_hf.training.lora_finetune import main as lora_main
from dfm_hf.training.train import evaluate_model
from dfm_hf.training.train import main as train_main

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

#: A chat template that ends every turn with the EOS token (as ChatML-style templates do).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def chat_tokenizer():
    tok = ch.tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def pairs(seed: int, n: int) -> list[dict[str, str]]:
    """A mapping the base models cannot know: the prompt names a word, the completion returns it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(WORDS)
        out.append({"prompt": f"# {word}\n", "completion": f"def {word}():\n    return '{word}'\n"})
    return out


def chats(seed: int, n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]}
        for p in pairs(seed, n)
    ]


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sft")
    return {
        "pairs_train": write_jsonl(root / "pairs_train.jsonl", pairs(0, 200)),
        "pairs_val": write_jsonl(root / "pairs_val.jsonl", pairs(1, 24)),
        "chat_train": write_jsonl(root / "chat_train.jsonl", chats(2, 200)),
        "chat_val": write_jsonl(root / "chat_val.jsonl", chats(3, 24)),
    }


@pytest.fixture(scope="module")
def llada(tmp_path_factory) -> str:
    folder = ch.write_checkpoint(
        str(tmp_path_factory.mktemp("llada") / "llada"), ch.llada_tensors(ch.llama_source()), ch.llada_config()
    )
    ch.save_tokenizer(ch.llada_tokenizer(), folder, drop_mask=True)
    return folder


@pytest.fixture(scope="module")
def dream(tmp_path_factory) -> str:
    folder = ch.write_checkpoint(
        str(tmp_path_factory.mktemp("dream") / "dream"), ch.dream_tensors(ch.qwen2_source()), ch.dream_config()
    )
    ch.save_tokenizer(chat_tokenizer(), folder, custom_class="DreamTokenizer")
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Rows: the prompt conditions, the response + EOS is scored
# ---------------------------------------------------------------------------------------------------------------------


def test_prompt_completion_rows_condition_on_the_prompt_and_score_response_and_eos():
    import datasets

    tok = ch.tiny_tokenizer()
    ds = datasets.Dataset.from_list([{"prompt": "x = ", "completion": "1 + 2"}, {"prompt": "# a", "completion": "b"}])
    rows = tokenize_sft(ds, tok, seq_len=64)
    prompt = tok("x = ", add_special_tokens=False)["input_ids"]
    response = tok("1 + 2", add_special_tokens=False)["input_ids"]
    assert rows.ids[0] == prompt + response + [tok.eos_token_id] and rows.prompt_lengths[0] == len(prompt)
    assert rows.num_response_tokens() == len(response) + 1 + len(rows.ids[1]) - rows.prompt_lengths[1]

    # every non-prompt position masked (t -> 0): the prompt stays clean and unscored, the EOS is scored
    collator = DFMDataCollator(mask_token_id=tok.mask_token_id, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               t_max=1e-6, generator=torch.Generator().manual_seed(0))  # fmt: skip
    batch = collator(rows[[0, 1]])
    n0 = len(rows.ids[0])
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt
    assert (batch["labels"][0, : len(prompt)] == -100).all() and batch["condition_mask"][0, : len(prompt)].all()
    assert (batch["input_ids"][0, len(prompt) : n0] == tok.mask_token_id).all()
    assert batch["labels"][0, n0 - 1] == tok.eos_token_id
    short = len(rows.ids[1])
    assert (batch["attention_mask"][1, short:] == 0).all() and (batch["labels"][1, short:] == -100).all()


def test_chat_rows_use_the_template_and_stop_after_the_turns_eos():
    import datasets

    tok = chat_tokenizer()
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f(): pass"}]
    rows = tokenize_sft(datasets.Dataset.from_list([{"messages": conversation}]), tok, seq_len=64)
    prompt_text = tok.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=False)
    assert prompt_text == "<|user|>hi<|endoftext|><|assistant|>"
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert rows.prompt_lengths[0] == len(prompt) and rows.ids[0][: len(prompt)] == prompt
    response = rows.ids[0][len(prompt) :]
    assert tok.decode(response) == "def f(): pass<|endoftext|>" and response.count(tok.eos_token_id) == 1

    with pytest.raises(ValueError, match="example 0.*last turn"):
        tokenize_sft(datasets.Dataset.from_list([{"messages": conversation[:1] * 2}]), tok, seq_len=64)
    with pytest.raises(ValueError, match="--prompt_column"):
        tokenize_sft(datasets.Dataset.from_list([{"text": "x"}]), tok, seq_len=64)
    with pytest.raises(ValueError, match="chat template"):
        tokenize_sft(datasets.Dataset.from_list([{"messages": conversation}]), ch.tiny_tokenizer(), seq_len=64)


def test_long_examples_keep_their_prompt_and_are_truncated_or_dropped():
    import datasets

    tok = ch.tiny_tokenizer()
    ds = datasets.Dataset.from_list(
        [
            {"prompt": "a " * 20, "completion": "b " * 20},
            {"prompt": "a " * 40, "completion": "b"},
            {"prompt": "a", "completion": "b"},
        ]
    )
    rows = tokenize_sft(ds, tok, seq_len=24)
    assert rows.stats == {"examples": 3, "truncated": 1, "dropped": 1}
    assert len(rows) == 2 and len(rows.ids[0]) == 24 and rows.prompt_lengths[0] < 24
    with pytest.raises(ValueError, match="--train_file.*no SFT example fits"):
        tokenize_sft(datasets.Dataset.from_list([{"prompt": "a " * 40, "completion": "b"}]), tok, seq_len=24)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA on converted LLaDA / Dream checkpoints, loaded back with pipe.load_lora_weights
# ---------------------------------------------------------------------------------------------------------------------


def sft_lora_args(base: str, train: str, val: str, out: str, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", base, "--sft", "--train_file", train, "--validation_file", val,
        "--seq_len", "48", "--train_batch_size", "8", "--max_train_steps", "30", "--learning_rate", "1e-2",
        "--warmup_steps", "2", "--lora_r", "4", "--lora_alpha", "8", "--eval_steps", "1000", "--eval_batches", "3",
        "--num_samples", "0", "--logging_steps", "5", "--no_progress", "--output_dir", out, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("family, data", [("llada", "pairs"), ("dream", "chat")])
def test_lora_sft_on_a_converted_released_model_loads_back(family, data, llada, dream, sft_data, tmp_path):
    base = {"llada": llada, "dream": dream}[family]
    out = str(tmp_path / "adapter")
    final = lora_main(sft_lora_args(base, sft_data[f"{data}_train"], sft_data[f"{data}_val"], out,
                                    "--loss_weighting", "inverse_t"))  # fmt: skip
    assert final["val_loss"] < final["base_val_loss"] - 0.5, final
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
        assert set(json.load(f)["target_modules"]) == set(LORA_TARGET_MODULES)

    pipe = DFMPipeline.from_pretrained(base)  # converted on load, as the adapter was trained
    tok = pipe.tokenizer
    if family == "dream":
        prompt = tok.apply_chat_template([{"role": "user", "content": "# gamma\n"}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    else:
        prompt = "# gamma\n"
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] + [pipe.mask_token_id] * 8])
    with torch.no_grad():
        before = pipe.model(ids).logits
        pipe.load_lora_weights(out)
        after = pipe.model(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"messages": [{"role": "user", "content": "# gamma\n"}]} if family == "dream" else {"prompt": prompt}
    result = pipe(**kwargs, gen_length=12, num_inference_steps=12, generator=torch.Generator().manual_seed(0))
    assert isinstance(result.texts[0], str)


# ---------------------------------------------------------------------------------------------------------------------
# Full fine-tuning of a released checkpoint with train_dfm.py
# ---------------------------------------------------------------------------------------------------------------------


def test_full_sft_of_a_released_model_with_train_dfm(dream, sft_data, tmp_path):
    out = str(tmp_path / "full")
    final = train_main([
        "--init_from_pretrained", dream, "--sft", "--train_file", sft_data["chat_train"],
        "--validation_file", sft_data["chat_val"], "--seq_len", "48", "--train_batch_size", "8",
        "--max_train_steps", "20", "--learning_rate", "3e-3", "--warmup_steps", "2", "--eval_steps", "1000",
        "--eval_batches", "3", "--num_samples", "0", "--logging_steps", "5", "--checkpointing_steps", "1000",
        "--no_progress", "--output_dir", out,
    ])  # fmt: skip
    base = DFMPipeline.from_pretrained(dream)
    val = tokenize_sft(load_sft_dataset([sft_data["chat_val"]]), base.tokenizer, seq_len=48)
    args = types.SimpleNamespace(train_batch_size=8, eval_batches=3, num_samples=0, seq_len=48)
    path = DiscreteFlowScheduler.from_config(base.scheduler.config)  # the probability path the run trained on
    before = evaluate_model(base.model, val, path, args, base.tokenizer)["val_loss"]
    assert final["val_loss"] < before - 0.5, (before, final["val_loss"])

    tuned = DFMPipeline.from_pretrained(out)
    assert tuned.model.config.logits_shift is True  # Dream's shifted logits survive the round trip
    assert isinstance(tuned.scheduler, ConfidenceUnmaskingScheduler)  # and its family sampler and presets
    assert "dream-entropy" in tuned.scheduler_presets
