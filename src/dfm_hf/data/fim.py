"""Fill-in-the-middle (FIM) layout: one home for the order of the pieces, shared by training data and infilling.

A text split as ``prefix | middle | suffix`` is laid out in the suffix-prefix-middle order (SPM, the variant of
Bavarian et al., 2022, "Efficient Training of Language Models to Fill in the Middle", in which the prefix and the
middle stay contiguous)::

    <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

so the middle is written as the continuation of the prefix, after the suffix was read: the natural task of a model
that attends causally across blocks. At inference the prompt is the layout with an empty middle; only the middle is
generated. The three control tokens are the tokenizer's ``<fim_prefix>`` / ``<fim_suffix>`` / ``<fim_middle>`` when
it has them (StarCoder-style vocabularies), else added ones (:func:`fim_token_ids_of`); a model declares them in
``config.fim_token_ids = {"prefix": id, "suffix": id, "middle": id}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: The roles of the control tokens and their token strings.
FIM_TOKENS: dict[str, str] = {"prefix": "<fim_prefix>", "suffix": "<fim_suffix>", "middle": "<fim_middle>"}
#: Control tokens in a FIM layout.
NUM_FIM_TOKENS = len(FIM_TOKENS)

__all__ = ["FIM_TOKENS", "NUM_FIM_TOKENS", "fim_layout", "fim_rewrite", "fim_token_ids_of"]


def fim_layout(
    prefix: Sequence[int], suffix: Sequence[int], fim_token_ids: Mapping[str, int], middle: Sequence[int] = ()
) -> tuple[list[int], list[int]]:
    """The SPM layout ``[<fim_prefix>, <fim_suffix>, *suffix, <fim_middle>, *prefix, *middle]`` (module docstring)
    and the positions of its three control tokens. With an empty ``middle`` it is the infilling prompt."""
    ids = [fim_token_ids["prefix"], fim_token_ids["suffix"], *suffix, fim_token_ids["middle"], *prefix, *middle]
    return ids, [0, 1, 2 + len(suffix)]


def fim_rewrite(
    ids: torch.Tensor, start: int, end: int, fim_token_ids: Mapping[str, int]
) -> tuple[torch.Tensor, list[int]]:
    """A row of training data as FIM, of the same length: ``ids[start:end]`` is the middle, the prefix and suffix
    the rest of ``ids[: len - 3]`` (the last three tokens make room for the control tokens).

    Returns the rewritten 1-d LongTensor and the positions of its control tokens. Every token of
    ``ids[: len - 3]`` appears exactly once in it. Requires ``0 <= start < end <= len(ids) - 3``.
    """
    n = ids.numel() - NUM_FIM_TOKENS
    if not 0 <= start < end <= n:
        raise ValueError(f"the middle [start, end) = [{start}, {end}) must be a non-empty span of [0, {n}).")
    kept = ids[:n].tolist()
    out, controls = fim_layout(kept[:start], kept[end:], fim_token_ids, kept[start:end])
    return torch.tensor(out, dtype=ids.dtype), controls


def fim_token_ids_of(tokenizer: Any) -> dict[str, int]:
    """The ids of ``<fim_prefix>`` / ``<fim_suffix>`` / ``<fim_middle>`` in ``tokenizer``, adding the missing ones as
    special tokens (new ids ``len(tokenizer)``, ``+1``, ...; the model needs rows for them)."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in FIM_TOKENS.values() if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {role: int(tokenizer.convert_tokens_to_ids(token)) for role, token in FIM_TOKENS.items()}
