"""Data helpers: tokenizers and corpora."""

from .tokenizer import EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, train_bpe_tokenizer
