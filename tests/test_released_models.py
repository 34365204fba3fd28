"""Released diffusion LMs load natively: LLaDA and Dream / DiffuCoder checkpoints (tiny, in their exact formats)
convert on load, match transformers' own forward run bidirectionally, and load strictly. No network: the Hub
tests use the loopback Hub server of tests/hub_server.py."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from huggingface_hub import HfApi

from dfm_hf import DFMPipeline
from dfm_hf.conversion import (
    RELEASED_MODEL_TYPES,
    dream_config_to_dfm,
    llada_config_to_dfm,
    read_checkpoint_index,
    released_dfm_config,
)
from dfm_hf.conversion.checkpoint import iter_tensors
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.pipelines.released import RELEASED_PRESET_SPECS, released_pipeline_components
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

ATOL = 1e-4


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return ch.llama_source()


@pytest.fixture(scope="module")
def qwen2() -> torch.nn.Module:
    return ch.qwen2_source()


def llada_folder(path, source, shards: int = 1, tensors=None, tokenizer: bool = False, **config) -> str:
    folder = ch.write_checkpoint(str(path), tensors or ch.llada_tensors(source), ch.llada_config(**config), shards)
    if tokenizer:
        ch.save_tokenizer(ch.llada_tokenizer(), folder, drop_mask=True)
    return folder


def dream_folder(path, source, shards: int = 1, tensors=None, tokenizer: bool = False, **config) -> str:
    folder = ch.write_checkpoint(str(path), tensors or ch.dream_tensors(source), ch.dream_config(**config), shards)
    if tokenizer:
        ch.save_tokenizer(ch.tiny_tokenizer(), folder, custom_class="DreamTokenizer")
    return folder


def max_diff_llada(model, source) -> float:
    """Our logits against the Llama source run bidirectionally (additive 4-D mask), at the real positions."""
    ids, attention = ch.padded_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=attention).logits.float()
        theirs = source(input_ids=ids, attention_mask=ch.bidirectional_mask(attention)).logits.float()
    real = attention.bool()
    return float((ours[real] - theirs[real]).abs().max())


def max_diff_dream(model, source) -> float:
    """Ours against the Qwen2 source run bidirectionally, shifted (their output at i - 1 is our position i)."""
    ids, attention = ch.padded_batch(vocab=300)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=attention).logits.float()
        theirs = source(input_ids=ids, attention_mask=ch.bidirectional_mask(attention)).logits.float()
    shifted = torch.cat([theirs[:, :1], theirs[:, :-1]], dim=1)
    real = attention.bool()
    return float((ours[real] - shifted[real]).abs().max())


# --------------------------------------------------------------------------------------------------------------------
# Parity with transformers' forward
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_llada_matches_bidirectional_llama(tmp_path, llama, shards):
    model = DFMForMaskedGeneration.from_pretrained(llada_folder(tmp_path, llama, shards), dtype=torch.float32)
    cfg = model.config
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id, cfg.num_key_value_heads) == (ch.ROWS, 384, 1, 2)
    assert cfg.logits_shift is False and cfg.tie_word_embeddings is False and cfg.rope_theta == 500000.0
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert max_diff_llada(model, llama) < ATOL
    ids, attention = ch.padded_batch()
    with torch.no_grad():  # the comparison can fail: a causal run of the source differs
        causal = llama(input_ids=ids).logits
        ours = model(input_ids=ids, attention_mask=attention).logits
    assert float((ours[0] - causal[0]).abs().max()) > 1e-2


def test_llada_tied_embeddings(tmp_path):
    source = ch.llama_source(tied=True, seed=3)
    model = DFMForMaskedGeneration.from_pretrained(llada_folder(tmp_path, source, weight_tying=True))
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert max_diff_llada(model, source) < ATOL


@pytest.mark.parametrize("shards", [1, 2])
def test_dream_matches_shifted_bidirectional_qwen2(tmp_path, qwen2, shards):
    model = DFMForMaskedGeneration.from_pretrained(dream_folder(tmp_path, qwen2, shards))
    cfg = model.config
    assert cfg.logits_shift is True and cfg.attention_bias is True and cfg.tie_word_embeddings is False
    assert (cfg.mask_token_id, cfg.pad_token_id, cfg.vocab_size) == (ch.DREAM_MASK, 0, ch.ROWS)
    assert model.dtype == torch.float32  # config torch_dtype
    assert max_diff_dream(model, qwen2) < ATOL


def test_converted_model_saves_in_our_format(tmp_path, llama):
    model = DFMForMaskedGeneration.from_pretrained(llada_folder(tmp_path / "llada", llama, 2))
    model.save_pretrained(tmp_path / "ours")
    with open(tmp_path / "ours" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["model_type"] == "dfm"
    again = DFMForMaskedGeneration.from_pretrained(tmp_path / "ours")
    ids, attention = ch.padded_batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=attention).logits
        b = again(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------------
# Strictness
# --------------------------------------------------------------------------------------------------------------------


def test_missing_tensor_is_named(tmp_path, llama):
    tensors = ch.llada_tensors(llama)
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensors: model\.transformer\.blocks\.1\.up_proj\.weight"):
        DFMForMaskedGeneration.from_pretrained(llada_folder(tmp_path, llama, 2, tensors=tensors))


def test_unexpected_tensor_is_named(tmp_path, qwen2):
    tensors = ch.dream_tensors(qwen2)
    tensors["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(ch.FFN)
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.mlp\.gate_proj\.bias"):
        DFMForMaskedGeneration.from_pretrained(dream_folder(tmp_path, qwen2, tensors=tensors))


def test_wrong_shape_is_named(tmp_path, llama):
    tensors = ch.llada_tensors(llama)
    tensors["model.transformer.blocks.0.ff_proj.weight"] = torch.zeros(ch.FFN + 1, ch.HIDDEN)
    with pytest.raises(ValueError, match=r"blocks\.0\.ff_proj\.weight \(49, 32\) \(expected \(48, 32\)\)"):
        DFMForMaskedGeneration.from_pretrained(llada_folder(tmp_path, llama, tensors=tensors))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"block_type": "sequential"}, "block_type"),
        ({"include_bias": True}, "include_bias"),
        ({"include_qkv_bias": True}, "include_qkv_bias"),
        ({"layer_norm_type": "default"}, "layer_norm_type"),
        ({"attention_layer_norm": True}, "attention_layer_norm"),
        ({"alibi": True}, "alibi"),
        ({"rope": False}, "rope"),
        ({"activation_type": "gelu"}, "activation_type"),
        ({"scale_logits": True}, "scale_logits"),
        ({"input_emb_norm": True}, "input_emb_norm"),
        ({"block_group_size": 2}, "block_group_size"),
        ({"num_experts": 64, "expert_intermediate_size": 1024}, "mixture-of-experts"),
    ],
)
def test_unsupported_llada_config_is_refused(overrides, key):
    with pytest.raises(ValueError, match=key):
        llada_config_to_dfm(ch.llada_config(**overrides))


def test_llada_moe_is_refused():
    moe = {"model_type": "llada", "hidden_size": 2048, "num_experts": 64, "moe_topk": 8, "num_hidden_layers": 16}
    with pytest.raises(ValueError, match="LLaDA-MoE"):
        released_dfm_config(moe)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "proportional", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_dream_config_is_refused(overrides, key):
    with pytest.raises(ValueError, match=key):
        dream_config_to_dfm(ch.dream_config(**overrides))


def test_unknown_model_type_is_refused_before_reading_weights(tmp_path, llama):
    folder = llada_folder(tmp_path, llama, model_type="gpt2")
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"not read")
    accepted = re.escape(f"accepted: {sorted(RELEASED_MODEL_TYPES)}")  # Dream, llada and the other families
    with pytest.raises(ValueError, match=rf"'gpt2'.*{accepted}"):
        DFMForMaskedGeneration.from_pretrained(folder)


def test_unsupported_value_refused_through_from_pretrained(tmp_path, llama):
    with pytest.raises(ValueError, match=r"`block_type` = 'sequential' is not supported; accepted: 'llama'"):
        DFMForMaskedGeneration.from_pretrained(llada_folder(tmp_path, llama, block_type="sequential"))


def test_pickles_are_refused(tmp_path, llama):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ch.llada_config()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    with pytest.raises(ValueError, match="pytorch_model.bin.*pickle"):
        DFMForMaskedGeneration.from_pretrained(folder)


def test_truncated_released_shard_is_named(tmp_path, llama):
    folder = llada_folder(tmp_path, llama, 3)
    shard = os.path.join(folder, "model-00002-of-00003.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(OSError, match=r"model-00002-of-00003\.safetensors in .* is not a valid safetensors file"):
        DFMForMaskedGeneration.from_pretrained(folder)


def test_truncated_data_of_a_single_file_checkpoint_is_named(tmp_path, llama):
    """The header is intact and only the data ends early: refused before any tensor is read, naming the file."""
    folder = llada_folder(tmp_path, llama)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        header_end = 8 + int.from_bytes(f.read(8), "little")
    size = os.path.getsize(path)
    assert size - 4 > header_end
    with open(path, "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(OSError, match=rf"model\.safetensors in {re.escape(folder)} is not a valid safetensors file"):
        DFMForMaskedGeneration.from_pretrained(folder)


def test_checkpoint_index_reads_headers_and_tensors_lazily(tmp_path, llama):
    """The index holds every tensor's file, dtype and shape from the headers; a tensor is read when asked for, so a
    shard broken after indexing is named by that read."""
    tensors = ch.llada_tensors(llama)
    tensors["model.transformer.wte.weight"] = tensors["model.transformer.wte.weight"].to(torch.bfloat16)
    folder = llada_folder(tmp_path, llama, 2, tensors=tensors)
    index = read_checkpoint_index(folder)
    assert set(index.tensors) == set(tensors)
    for name, tensor in tensors.items():
        assert (index.tensors[name].dtype, index.tensors[name].shape) == (tensor.dtype, tuple(tensor.shape))
    bf16 = tensors["model.transformer.wte.weight"].numel()
    assert index.floating_dtype() == (
        torch.bfloat16 if 2 * bf16 > sum(t.numel() for t in tensors.values()) else torch.float32
    )
    name = "model.transformer.wte.weight"
    ((read, loaded),) = iter_tensors(index, [name])
    assert read == name
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, tensors[name])
    path = os.path.join(folder, index.tensors[name].file)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(OSError, match=rf"{re.escape(index.tensors[name].file)} in .* is not a valid safetensors file"):
        list(iter_tensors(index, [name]))


def test_converted_weights_own_their_memory(tmp_path, llama):
    """The weights are read into fresh memory, never left mapped from the file: overwriting the checkpoint in place
    after loading (as saving to the same folder does) leaves the model unchanged."""
    folder = llada_folder(tmp_path, llama)
    model = DFMForMaskedGeneration.from_pretrained(folder, dtype=torch.float32)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        header_end = 8 + int.from_bytes(f.read(8), "little")
    with open(path, "r+b") as f:
        f.seek(header_end)
        f.write(bytes(os.path.getsize(path) - header_end))
    assert max_diff_llada(model, llama) < ATOL


def test_truncated_own_checkpoint_names_the_file(tmp_path):
    torch.manual_seed(0)
    config = DFMConfig.from_preset("tiny", vocab_size=64, mask_token_id=63)
    DFMForMaskedGeneration(config).save_pretrained(tmp_path / "model")
    path = tmp_path / "model" / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(OSError, match=r"model\.safetensors in .*model .*is not a valid safetensors file"):
        DFMForMaskedGeneration.from_pretrained(tmp_path / "model")


def test_truncated_weights_of_a_bundled_pipeline_copy_are_named(tmp_path):
    import shutil

    from dfm_hf.bundles.shipped import small_model_path

    shutil.copytree(small_model_path(), tmp_path / "pipe")
    path = tmp_path / "pipe" / "model" / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(OSError, match=r"model\.safetensors in .*pipe/model .*truncated"):
        DFMPipeline.from_pretrained(tmp_path / "pipe")


def test_own_checkpoint_with_a_missing_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = DFMConfig.from_preset("tiny", vocab_size=64, mask_token_id=63)
    DFMForMaskedGeneration(config).save_pretrained(tmp_path / "model")
    path = str(tmp_path / "model" / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.mlp\.up_proj\.weight"):
        DFMForMaskedGeneration.from_pretrained(tmp_path / "model")
    model, info = DFMForMaskedGeneration.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert "model.layers.1.mlp.up_proj.weight" in info["missing_keys"]


# --------------------------------------------------------------------------------------------------------------------
# dtype and device_map
# --------------------------------------------------------------------------------------------------------------------


def test_dtype_bfloat16_is_honoured(tmp_path, llama):
    model = DFMForMaskedGeneration.from_pretrained(llada_folder(tmp_path, llama, 2), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.dtype in (torch.bfloat16, "bfloat16")
    rounded = copy.deepcopy(llama)  # the same weights rounded to bf16 as ours were (its rotary buffer untouched)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert max_diff_llada(model.float(), rounded) < ATOL


def test_auto_dtype_is_the_checkpoints(tmp_path, llama):
    tensors = {k: v.to(torch.bfloat16) for k, v in ch.llada_tensors(llama).items()}
    model = DFMForMaskedGeneration.from_pretrained(llada_folder(tmp_path, llama, tensors=tensors))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_device_map(tmp_path, qwen2, device_map):
    model = DFMForMaskedGeneration.from_pretrained(dream_folder(tmp_path, qwen2), device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert max_diff_dream(model, qwen2) < ATOL


# --------------------------------------------------------------------------------------------------------------------
# From the (loopback) Hub, and straight into a pipeline
# --------------------------------------------------------------------------------------------------------------------


def upload(folder: str, repo_id: str) -> str:
    api = HfApi()
    api.create_repo(repo_id)
    with open(os.path.join(folder, "modeling_llada.py"), "w", encoding="utf-8") as f:  # code is never fetched
        f.write("raise SystemExit('remote code ran')\n")
    return api.upload_folder(repo_id=repo_id, folder_path=folder).oid


def test_llada_from_the_hub(tmp_path, llama, hub_repo_id):
    commit = upload(llada_folder(tmp_path / "src", llama, 2, tokenizer=True), hub_repo_id)
    cache = str(tmp_path / "cache")
    model = DFMForMaskedGeneration.from_pretrained(hub_repo_id, cache_dir=cache, revision=commit)
    assert max_diff_llada(model, llama) < ATOL
    parts = released_pipeline_components(hub_repo_id, cache_dir=cache, revision=commit)
    snapshot = os.path.join(cache, f"models--{hub_repo_id.replace('/', '--')}", "snapshots", commit)
    assert not [f for f in os.listdir(snapshot) if f.endswith(".py")]
    tok, scheduler = parts["tokenizer"], parts["scheduler"]
    assert (tok.mask_token, tok.mask_token_id) == ("<|mdm_mask|>", ch.LLADA_MASK)
    assert isinstance(scheduler, ConfidenceUnmaskingScheduler)
    assert (scheduler.config.block_length, scheduler.config.temperature) == (32, 0.0)
    assert scheduler.config.mask_token_id == ch.LLADA_MASK and scheduler.config.vocab_size == ch.ROWS
    assert list(parts["scheduler_presets"]) == list(RELEASED_PRESET_SPECS["llada"])
    assert max_diff_llada(parts["model"], llama) < ATOL

    offline = released_pipeline_components(hub_repo_id, cache_dir=cache, revision=commit, local_files_only=True)
    assert offline["tokenizer"].mask_token_id == ch.LLADA_MASK

    pipe = DFMPipeline(model=parts["model"], scheduler=scheduler, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(input_ids=[[5, 6, 7]], gen_length=8, num_inference_steps=4, output_type="pt")
    assert out.sequences.shape == (1, 11) and not (out.sequences == ch.LLADA_MASK).any()

    pulled = DFMPipeline.from_pretrained(hub_repo_id, cache_dir=cache, revision=commit, use_safetensors=True)
    assert set(RELEASED_PRESET_SPECS["llada"]) <= set(pulled.scheduler_presets)
    pulled.set_progress_bar_config(disable=True)
    again = pulled(input_ids=[[5, 6, 7]], gen_length=8, num_inference_steps=4, output_type="pt")
    assert torch.equal(again.sequences, out.sequences)  # greedy: the same tokens


def test_dream_pipeline_components_without_remote_code(tmp_path, qwen2):
    parts = released_pipeline_components(dream_folder(tmp_path, qwen2, tokenizer=True), dtype=torch.bfloat16)
    assert parts["model"].dtype == torch.bfloat16 and parts["model"].config.logits_shift is True
    assert parts["tokenizer"].mask_token_id == ch.DREAM_MASK  # DreamTokenizer (remote code) -> the standard class
    scheduler = parts["scheduler"]
    assert isinstance(scheduler, ConfidenceUnmaskingScheduler)
    assert (scheduler.config.confidence, scheduler.config.temperature, scheduler.config.top_p) == ("entropy", 0.2, 0.95)
    presets = parts["scheduler_presets"]
    assert presets["dream-margin"].config.confidence == "margin"
    assert isinstance(presets["dream-origin"], DiscreteFlowScheduler)
    assert presets["dream-origin"].config.kappa_exponent == 1.0

    pipe = DFMPipeline(model=parts["model"], scheduler=scheduler, tokenizer=parts["tokenizer"])
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipe(input_ids=[[5, 6, 7], [8, 9]], gen_length=6, num_inference_steps=3, generator=generator)
    assert out.sequences.shape == (2, 9) and not (out.sequences[0] == ch.DREAM_MASK).any()


def test_pipeline_components_refuse_a_mask_id_outside_the_tokenizer(tmp_path, llama):
    folder = llada_folder(tmp_path, llama, tokenizer=True, mask_token_id=390)
    with pytest.raises(ValueError, match="mask id 390 is not a token of its tokenizer"):
        released_pipeline_components(folder)
