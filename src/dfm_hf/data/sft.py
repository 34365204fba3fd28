"""Supervised fine-tuning data: ``prompt`` / ``completion`` pairs or chat ``messages``, one example per row.

Each example becomes ``prompt ids + response ids + EOS``: the prompt is the conditioning part (never corrupted, never
scored: its positions carry ``condition_mask = True``), the response and the EOS after it are corrupted and scored,
so the model learns to end. Rows are not packed; the collator pads each batch (padding is never attended, corrupted
or scored).

- ``prompt`` / ``completion`` columns (names configurable): the texts are tokenized as they are (no chat template,
  no special tokens added: what ``pipe(prompt=...)`` does), EOS appended.
- ``messages`` column (a list of ``{"role", "content"}``): the tokenizer's chat template is applied. The prompt part
  is every turn but the last, which must be the assistant's, with the generation prompt (what ``pipe(messages=...)``
  feeds the model); the response is the rest of the templated conversation. When the template ends the turn with the
  EOS token, the response stops right after it; otherwise EOS is appended.

Examples longer than ``seq_len`` keep their prompt and lose the end of their response; an example whose prompt
leaves no room for a response token is dropped (both are counted in :attr:`SFTRows.stats`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

SFT_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")


class SFTRows:
    """Tokenized SFT examples: ``rows[[i, j, ...]]`` gives the collator's examples (``input_ids`` and
    ``condition_mask``, True on the prompt); ``len(rows)`` is the number of examples."""

    def __init__(self, ids: list[list[int]], prompt_lengths: list[int], stats: dict[str, int]) -> None:
        self.ids, self.prompt_lengths, self.stats = ids, prompt_lengths, stats

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, positions: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        out = []
        for pos in positions:
            ids = torch.tensor(self.ids[pos], dtype=torch.long)
            cond = torch.zeros(ids.numel(), dtype=torch.bool)
            cond[: self.prompt_lengths[pos]] = True
            out.append({"input_ids": ids, "condition_mask": cond})
        return out

    def num_response_tokens(self) -> int:
        """Scored positions of all rows (response + EOS)."""
        return sum(len(i) - p for i, p in zip(self.ids, self.prompt_lengths))


def load_sft_dataset(files: Sequence[str], argument: str = "--train_file") -> Any:
    """The json / jsonl / parquet ``files`` as one ``datasets`` dataset; ``ValueError`` naming ``argument`` for other
    file kinds."""
    import datasets

    files = [f for f in files if os.path.getsize(f) > 0]
    bad = [f for f in files if not f.lower().endswith(SFT_SUFFIXES)]
    if bad or not files:
        raise ValueError(
            f"`{argument}` with `--sft` takes json / jsonl / parquet files (columns prompt/completion or messages), "
            f"got {bad[:3] or 'no non-empty file'}."
        )
    kinds = {"parquet" if f.lower().endswith(".parquet") else "json" for f in files}
    if len(kinds) != 1:
        raise ValueError(f"`{argument}`: mix of json and parquet files; pass one kind at a time.")
    return datasets.load_dataset(kinds.pop(), data_files=list(files), split="train")


def sft_format(columns: Sequence[str], prompt_column: str, completion_column: str, messages_column: str) -> str:
    """``"messages"`` or ``"prompt_completion"`` from the dataset's columns; ``ValueError`` naming the flags."""
    if messages_column in columns:
        return "messages"
    if prompt_column in columns and completion_column in columns:
        return "prompt_completion"
    raise ValueError(
        f"`--sft` data needs a `--messages_column` ({messages_column!r}) column or `--prompt_column` "
        f"({prompt_column!r}) and `--completion_column` ({completion_column!r}) columns; the data has {list(columns)}."
    )


def chat_prompt_and_response(tokenizer: Any, messages: Any, where: str) -> tuple[str, str]:
    """``(prompt text, response text)`` of a conversation whose last turn is the assistant's (see the module doc)."""
    if (
        not isinstance(messages, (list, tuple))
        or len(messages) < 2
        or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    ):
        raise ValueError(f"{where}: `messages` must be a list of at least two {{'role', 'content'}} turns.")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last turn of `messages` must be the assistant's (the response to learn).")
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            f"{where}: the chat template does not render the conversation as its prompt (with the generation prompt) "
            "followed by the last turn; it cannot be split into prompt and response."
        )
    return prompt, full[len(prompt) :]


def tokenize_sft(
    ds: Any,
    tokenizer: Any,
    seq_len: int,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
    argument: str = "--train_file",
) -> SFTRows:
    """Tokenize a ``datasets`` dataset of SFT examples into :class:`SFTRows` (at most ``seq_len`` tokens each)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("`--sft` needs a tokenizer with an eos token (it ends every response).")
    kind = sft_format(ds.column_names, prompt_column, completion_column, messages_column)
    if kind == "messages" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"`{argument}` holds chat `messages` but the tokenizer has no chat template.")
    prompts, responses = [], []
    for i, example in enumerate(ds):
        where = f"`{argument}` example {i}"
        if kind == "messages":
            prompt, response = chat_prompt_and_response(tokenizer, example[messages_column], where)
        else:
            prompt, response = example[prompt_column], example[completion_column]
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise ValueError(f"{where}: `{prompt_column}` and `{completion_column}` must be strings.")
        prompts.append(prompt)
        responses.append(response)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    ids, lengths = [], []
    stats = {"examples": len(prompts), "truncated": 0, "dropped": 0}
    for p, r in zip(p_ids, r_ids):
        r = list(r)
        if kind == "messages" and eos in r:
            r = r[: len(r) - r[::-1].index(eos)]  # the template ended the turn with EOS: stop right after it
        else:
            r.append(eos)
        if len(p) >= seq_len:
            stats["dropped"] += 1
            continue
        if len(p) + len(r) > seq_len:
            stats["truncated"] += 1
            r = r[: seq_len - len(p)]
        ids.append(list(p) + r)
        lengths.append(len(p))
    if not ids:
        raise ValueError(
            f"`{argument}`: no SFT example fits `--seq_len`={seq_len} with a response token "
            f"({stats['examples']} examples, {stats['dropped']} dropped for their prompt length)."
        )
    return SFTRows(ids, lengths, stats)


__all__ = ["SFTRows", "chat_prompt_and_response", "load_sft_dataset", "sft_format", "tokenize_sft"]
