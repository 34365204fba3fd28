"""Byte-level BPE tokenizers for DFM: trained with `tokenizers`, saved as a `PreTrainedTokenizerFast`."""

from __future__ import annotations

from collections.abc import Iterable

MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, MASK_TOKEN)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> object:
    """Train a byte-level BPE on ``texts`` with pad (id 0), eos (id 1) and mask (id 2) tokens.

    Returns a ``transformers.PreTrainedTokenizerFast`` whose ``mask_token``, ``pad_token`` and ``eos_token`` are set;
    decoding round-trips any text (byte-level).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"`vocab_size` must be an integer >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size!r}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, mask_token=MASK_TOKEN
    )
