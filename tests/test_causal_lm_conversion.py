"""From a causal LM to a DFM model (issue 19, section 1): Llama / Mistral / Qwen2 convert exactly (in causal
attention mode the converted model reproduces the source's next-token logits), tied embeddings stay tied, the mask
row is the mean of the real rows, an existing id can be reused, other architectures are refused."""

from __future__ import annotations

import os

import pytest
import torch
from huggingface_hub import HfApi

from dfm_hf.conversion import causal_lm_config_to_dfm
from dfm_hf.models import DFMForMaskedGeneration
from dfm_hf.pipelines.released import causal_lm_pipeline_components
from dfm_hf.schedulers import DiscreteFlowScheduler

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

ATOL = 1e-4
MASK = "<|dfm_mask|>"  # not a token of the test tokenizer (its own "<|mask|>" is id 2)


def causal_diff(model, source, skip_column=None) -> float:
    """Max |ours - theirs| with ours run under a causal 4-D mask: our position i is their position i - 1 (and
    position 0 reads its own hidden state). Columns past the source's table, and ``skip_column``, are left out."""
    ids, _ = ch.padded_batch(vocab=300, lengths=(12, 12))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=ch.causal_mask(*ids.shape)).logits.float()
        theirs = source(input_ids=ids).logits.float()
    ours = ours[..., : theirs.shape[-1]]
    if skip_column is not None:
        keep = torch.ones(theirs.shape[-1], dtype=torch.bool)
        keep[skip_column] = False
        ours, theirs = ours[..., keep], theirs[..., keep]
    first = (ours[:, 0] - theirs[:, 0]).abs().max()
    rest = (ours[:, 1:] - theirs[:, :-1]).abs().max()
    return float(max(first, rest))


@pytest.mark.parametrize(
    "make", [ch.llama_source, ch.mistral_source, ch.qwen2_source], ids=["llama", "mistral", "qwen2"]
)
def test_causal_mode_reproduces_next_token_logits(make):
    source = make()
    model = DFMForMaskedGeneration.from_causal_lm(source)
    cfg = model.config
    assert cfg.logits_shift is True and cfg.attention_bias is (source.config.model_type == "qwen2")
    assert cfg.max_position_embeddings == ch.MAX_POS
    assert (cfg.vocab_size, cfg.mask_token_id) == (ch.ROWS + 1, ch.ROWS)  # no tokenizer: a row after the table
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 1, 0)
    assert causal_diff(model, source) < ATOL
    ids, _ = ch.padded_batch(vocab=300, lengths=(12, 12))
    with torch.no_grad():  # and it is bidirectional by default: without the causal mask the logits differ
        bidirectional = model(input_ids=ids).logits[:, 1:, : ch.ROWS]
        theirs = source(input_ids=ids).logits[:, :-1]
    assert float((bidirectional - theirs).abs().max()) > 1e-2


def test_new_mask_row_is_the_mean_and_head_row_too():
    source = ch.llama_source(seed=4)
    model = DFMForMaskedGeneration.from_causal_lm(source)
    embed, head = source.model.embed_tokens.weight, source.lm_head.weight
    assert torch.allclose(model.model.embed_tokens.weight[ch.ROWS], embed.mean(0), atol=1e-6)
    assert torch.allclose(model.lm_head.weight[ch.ROWS], head.mean(0), atol=1e-6)
    assert torch.equal(model.model.embed_tokens.weight[: ch.ROWS], embed)


def test_tied_embeddings_stay_tied():
    source = ch.llama_source(tied=True, seed=5)
    model = DFMForMaskedGeneration.from_causal_lm(source)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert causal_diff(model, source) < ATOL


def test_existing_mask_id_is_reused():
    source = ch.qwen2_source(seed=6)
    model = DFMForMaskedGeneration.from_causal_lm(source, mask_token_id=5)
    assert (model.config.vocab_size, model.config.mask_token_id) == (ch.ROWS, 5)
    assert torch.equal(model.model.embed_tokens.weight, source.model.embed_tokens.weight)
    assert causal_diff(model, source) < ATOL
    with pytest.raises(ValueError, match=r"`mask_token_id` must be an existing id in \[0, 392\)"):
        DFMForMaskedGeneration.from_causal_lm(source, mask_token_id=ch.ROWS)


def test_other_architectures_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match=r"'gpt2'.*accepted: \['llama', 'mistral', 'qwen2'\]"):
        DFMForMaskedGeneration.from_causal_lm(gpt2)
    partial = ch.llama_source(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"rope_parameters.partial_rotary_factor.*accepted: 1\.0"):
        DFMForMaskedGeneration.from_causal_lm(partial)


def test_sliding_window_caps_the_length_and_stays_exact():
    source = ch.mistral_source(seed=9, sliding_window=16)  # the test rows (12 tokens) fit in the window
    model = DFMForMaskedGeneration.from_causal_lm(source)
    assert model.config.max_position_embeddings == 16
    assert causal_diff(model, source) < ATOL


def test_sliding_window_cap_from_the_config():
    from transformers import MistralConfig

    config = MistralConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=64,
        max_position_embeddings=4096,
        sliding_window=256,
    )
    assert causal_lm_config_to_dfm(config, 65, 64)["max_position_embeddings"] == 256


def save_llama_repo(folder, source, tokenizer) -> str:
    source.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_from_a_folder_with_its_tokenizer(tmp_path):
    source = ch.qwen2_source(seed=7)
    folder = save_llama_repo(tmp_path / "qwen2", source, ch.tiny_tokenizer())
    # 384 tokens, 392 rows: the new mask id is len(tokenizer) = 384, an unused row; the table does not grow
    model = DFMForMaskedGeneration.from_causal_lm(folder, mask_token=MASK, dtype=torch.float32)
    assert (model.config.vocab_size, model.config.mask_token_id) == (ch.ROWS, 384)
    embed = source.model.embed_tokens.weight
    assert torch.allclose(model.model.embed_tokens.weight[384], embed[:384].mean(0), atol=1e-6)
    assert causal_diff(model, source, skip_column=384) < ATOL
    with pytest.raises(ValueError, match=r"'<\|mask\|>' is already token 2"):
        DFMForMaskedGeneration.from_causal_lm(folder)  # the default "<|mask|>" is a token of this tokenizer

    parts = causal_lm_pipeline_components(folder, mask_token=MASK)
    tok = parts["tokenizer"]
    assert (tok.mask_token, tok.mask_token_id, len(tok)) == (MASK, 384, 385)
    assert isinstance(parts["scheduler"], DiscreteFlowScheduler)
    assert parts["scheduler"].config.mask_token_id == 384 and parts["scheduler"].config.vocab_size == ch.ROWS
    assert tok(f"x = {MASK}")["input_ids"][-1] == 384
    reused = causal_lm_pipeline_components(folder, mask_token_id=2)
    assert (reused["tokenizer"].mask_token_id, reused["model"].config.vocab_size) == (2, ch.ROWS)


def test_from_the_hub_fetches_no_code_or_pickles(tmp_path, hub_repo_id):
    source = ch.llama_source(seed=8)
    folder = save_llama_repo(tmp_path / "src", source, ch.tiny_tokenizer())
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"\x80\x04 never read")
    (tmp_path / "src" / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    api = HfApi()
    api.create_repo(hub_repo_id)
    commit = api.upload_folder(repo_id=hub_repo_id, folder_path=folder).oid
    cache = str(tmp_path / "cache")
    model = DFMForMaskedGeneration.from_causal_lm(hub_repo_id, mask_token=MASK, revision=commit, cache_dir=cache)
    assert model.config.mask_token_id == 384
    assert causal_diff(model, source, skip_column=384) < ATOL
    snapshot = os.path.join(cache, f"models--{hub_repo_id.replace('/', '--')}", "snapshots", commit)
    assert sorted(f for f in os.listdir(snapshot) if f.endswith((".py", ".bin"))) == []
