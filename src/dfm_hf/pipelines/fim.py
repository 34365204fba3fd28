"""The fill-in-the-middle control tokens of a pipeline: the tokenizer's ``<fim_prefix>`` / ``<fim_suffix>`` /
``<fim_middle>`` or added ones with new embedding rows, declared in ``config.fim_token_ids`` (layout:
:mod:`dfm_hf.data.fim`; infilling through them: :mod:`dfm_hf.generation.fim`)."""

from __future__ import annotations

from typing import Any

import torch

from ..data.fim import fim_token_ids_of

__all__ = ["add_fim_tokens"]


def add_fim_tokens(pipe: Any) -> list[int]:
    """Declare FIM control tokens on ``pipe``'s model (``config.fim_token_ids``): the tokenizer's ``<fim_prefix>`` /
    ``<fim_suffix>`` / ``<fim_middle>``, else added ones whose embedding rows (and untied head rows) start as the
    mean of the other tokens' rows, as the mask row of a converted causal LM does. The embedding table grows when a
    new id is past its end; the scheduler and presets follow the new ``vocab_size``. Returns the ids of the new
    tokens (empty when the model declares FIM tokens already or the tokenizer had them)."""
    model, tokenizer = pipe.model, pipe.tokenizer
    if getattr(model.config, "fim_token_ids", None) is not None:
        return []
    if tokenizer is None:
        raise ValueError("`pipe` needs a tokenizer to declare FIM tokens.")
    before = len(tokenizer)
    ids = fim_token_ids_of(tokenizer)
    new = sorted(i for i in ids.values() if i >= before)
    if new:
        rows = model.get_input_embeddings().weight.shape[0]
        if max(new) >= rows:
            model.resize_token_embeddings(max(new) + 1, mean_resizing=False)
        others = [i for i in range(min(before, rows)) if i != model.config.mask_token_id]
        tables = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not tables[0]:
            tables.append(head.weight)
        with torch.no_grad():
            for weight in tables:
                weight[new] = weight[others].float().mean(0).to(weight.dtype)
    model.config.fim_token_ids = ids
    vocab = model.config.vocab_size
    schedulers = {"": pipe.scheduler, **pipe.scheduler_presets}
    for name, scheduler in schedulers.items():
        if scheduler.config.get("vocab_size") not in (None, vocab):
            schedulers[name] = type(scheduler).from_config(scheduler.config, vocab_size=vocab)
    pipe.scheduler = schedulers.pop("")
    pipe.scheduler_presets = schedulers
    return new
