"""Quantized loading: ``quantization_config=`` in ``DFMForMaskedGeneration.from_pretrained`` / ``from_causal_lm`` and
``DFMPipeline.from_pretrained`` / ``from_causal_lm``, for our format and for checkpoints converted on load.

torchao's int8 weight-only quantization runs on CPU: the linear weights must really be int8 tensors, the model's
parameters must take less memory than in bf16, and its greedy tokens and logits must stay close to the bf16 model's.
bitsandbytes (CUDA only) is refused clearly here; tests/test_gpu.py loads it where a GPU is lent.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import tiny_pipeline

from dfm_hf import DFMForMaskedGeneration, DFMPipeline
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402
from transformers import BitsAndBytesConfig, GgufConfig, TorchAoConfig  # noqa: E402


def int8_config() -> TorchAoConfig:
    return TorchAoConfig(Int8WeightOnlyConfig())


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("llada"))
    ch.write_checkpoint(folder, ch.llada_tensors(ch.llama_source()), ch.llada_config(), shards=2)
    ch.save_tokenizer(ch.llada_tokenizer(), folder, drop_mask=True)
    return folder


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("dream"))
    ch.write_checkpoint(folder, ch.dream_tensors(ch.qwen2_source()), ch.dream_config())
    ch.save_tokenizer(ch.tiny_tokenizer(), folder)
    return folder


@pytest.fixture(scope="module")
def dfm_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("dfm"))
    tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor subclass counts its inner tensors (int data, scales...)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(nbytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(nbytes(p) for p in model.parameters())


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the linear layers of the transformer blocks (the output head stays in full precision)."""
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }


def assert_int8_linears(model: torch.nn.Module) -> None:
    from torchao.utils import TorchAOBaseTensor

    weights = linear_weights(model)
    assert len(weights) == 7 * model.config.num_hidden_layers
    for name, weight in weights.items():
        assert isinstance(weight, TorchAOBaseTensor), name
        assert weight.qdata.dtype == torch.int8 and weight.qdata.shape == weight.shape, name
    for name, param in model.named_parameters():  # everything else is a plain tensor
        if name.removesuffix(".weight") not in weights:
            assert type(param.data) is torch.Tensor, name
    assert type(model.lm_head.weight.data) is torch.Tensor
    assert model.config.quantization_config.quant_method == "torchao"


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_converted_checkpoint_loads_int8(family, llada_dir, dream_dir):
    folder = llada_dir if family == "llada" else dream_dir
    bf16 = DFMForMaskedGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    int8 = DFMForMaskedGeneration.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=int8_config())
    assert_int8_linears(int8)
    assert parameter_bytes(int8) < parameter_bytes(bf16)
    linear_int8 = sum(nbytes(w) for w in linear_weights(int8).values())
    linear_bf16 = sum(nbytes(w) for w in linear_weights(bf16).values())
    assert linear_int8 < 0.6 * linear_bf16  # one byte a weight plus a scale a row, against two bytes
    # the int8 weights dequantize to the bf16 ones within a quantization step of their row (max |w| / 127; bf16
    # scales and products add a rounding of their own)
    for (name, q), ref in zip(linear_weights(int8).items(), linear_weights(bf16).values()):
        ref = ref.detach().float()
        step = ref.abs().amax(dim=1, keepdim=True) / 127
        assert ((q.dequantize().float() - ref).abs() <= step + 2**-7 * ref.abs()).all(), name
    ids = torch.randint(3, 380, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits, logits = bf16(ids).logits.float(), int8(ids).logits.float()
    assert (logits - ref_logits).abs().max() <= 0.15 * ref_logits.abs().max()
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= 0.9


def test_our_format_loads_int8_and_keeps_strict_loading(dfm_dir, tmp_path):
    folder = os.path.join(dfm_dir, "model")
    bf16 = DFMForMaskedGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    int8 = DFMForMaskedGeneration.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=int8_config())
    assert_int8_linears(int8)
    assert parameter_bytes(int8) < parameter_bytes(bf16)
    as_dict = DFMForMaskedGeneration.from_pretrained(folder, quantization_config=int8_config().to_dict())
    assert_int8_linears(as_dict)
    # a quantized load still refuses weights that do not match the config
    broken = tmp_path / "broken"
    broken.mkdir()
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(folder, "model.safetensors"), broken / "model.safetensors")
    with pytest.raises(ValueError, match="mismatched shapes"):
        DFMForMaskedGeneration.from_pretrained(str(broken), quantization_config=int8_config())


def test_pipeline_greedy_tokens_agree_with_bf16(llada_dir):
    bf16 = DFMPipeline.from_pretrained(llada_dir, dtype=torch.bfloat16)
    int8 = DFMPipeline.from_pretrained(llada_dir, dtype=torch.bfloat16, quantization_config=int8_config())
    assert_int8_linears(int8.model)
    prompts = [[5 + i, 6 + 2 * i, 7, 8 + i] for i in range(16)]
    for pipe in (bf16, int8):
        pipe.set_progress_bar_config(disable=True)
        # greedy, every position committed from one model call: the arg-max tokens of one forward pass
        pipe.scheduler = ConfidenceUnmaskingScheduler(
            mask_token_id=ch.LLADA_MASK, vocab_size=pipe.model.config.vocab_size, temperature=0.0
        )
    one_step = dict(input_ids=prompts, gen_length=16, num_inference_steps=1, output_type="pt")
    ref, out = bf16(**one_step).sequences[:, 4:], int8(**one_step).sequences[:, 4:]
    assert not (out == ch.LLADA_MASK).any()
    assert (out == ref).float().mean() >= 0.9
    # step by step, a flipped near-tie changes the canvas the next steps see; on this random tiny model bf16 and
    # float32 agree on 0.6-0.9 of the tokens: int8 must stay in that range
    steps = dict(input_ids=prompts, gen_length=16, num_inference_steps=16, output_type="pt")
    assert (bf16(**steps).sequences == int8(**steps).sequences).float().mean() >= 0.6


def test_saved_pipeline_and_causal_lm_paths(dfm_dir, llada_dir, tmp_path):
    pipe = DFMPipeline.from_pretrained(dfm_dir, quantization_config=int8_config())
    assert_int8_linears(pipe.model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("def f(", gen_length=8, num_inference_steps=8, output_type="pt")
    assert not (out.sequences == pipe.tokenizer.mask_token_id).any()
    # a quantized pipeline saves quantized weights and loads them back as they were
    converted = DFMPipeline.from_pretrained(llada_dir, quantization_config=int8_config())
    converted.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "model" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "torchao"
    again = DFMPipeline.from_pretrained(tmp_path / "saved")
    assert_int8_linears(again.model)
    ids = torch.randint(3, 380, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, converted.model(ids).logits)
    # a causal LM: converted first, then quantized
    source = tmp_path / "llama"
    ch.llama_source(vocab=384).save_pretrained(source)
    ch.tiny_tokenizer().save_pretrained(source)
    ref = DFMForMaskedGeneration.from_causal_lm(str(source), mask_token_id=2)
    model = DFMForMaskedGeneration.from_causal_lm(str(source), mask_token_id=2, quantization_config=int8_config())
    assert_int8_linears(model)
    with torch.no_grad():
        ref_logits = ref(ids).logits
        assert (model(ids).logits - ref_logits).abs().max() <= 0.15 * ref_logits.abs().max()
    causal = DFMPipeline.from_causal_lm(str(source), quantization_config=int8_config(), mask_token="<|new_mask|>")
    assert_int8_linears(causal.model)
    assert causal.tokenizer.mask_token_id == causal.model.config.mask_token_id == 384


def test_bad_quantization_configs_are_refused(llada_dir, dfm_dir):
    model_folder = os.path.join(dfm_dir, "model")
    for bad in ("int8", 8, GgufConfig(), {"quant_method": "gptq", "bits": 4}):
        for folder in (llada_dir, model_folder):
            with pytest.raises(
                ValueError, match=r"`quantization_config`.*accepted: None, a transformers `TorchAoConfig`"
            ):
                DFMForMaskedGeneration.from_pretrained(folder, quantization_config=bad)
        with pytest.raises(ValueError, match=r"`quantization_config`.*accepted"):
            DFMPipeline.from_pretrained(llada_dir, quantization_config=bad)
    with pytest.raises(ValueError, match="neither 4- nor 8-bit"):
        DFMForMaskedGeneration.from_pretrained(llada_dir, quantization_config=BitsAndBytesConfig())
    from diffusers import PipelineQuantizationConfig

    mapped = PipelineQuantizationConfig(quant_mapping={"model": int8_config()})
    with pytest.raises(ValueError, match="PipelineQuantizationConfig applies to saved pipelines only"):
        DFMPipeline.from_pretrained(llada_dir, quantization_config=mapped)
    assert_int8_linears(DFMPipeline.from_pretrained(dfm_dir, quantization_config=mapped).model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal of bitsandbytes")
@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_is_refused_on_cpu(bits, llada_dir, dfm_dir):
    config = BitsAndBytesConfig(**{f"load_in_{bits}bit": True})
    for load in (
        lambda: DFMForMaskedGeneration.from_pretrained(llada_dir, quantization_config=config),
        lambda: DFMForMaskedGeneration.from_pretrained(os.path.join(dfm_dir, "model"), quantization_config=config),
        lambda: DFMPipeline.from_pretrained(llada_dir, quantization_config=config),
        lambda: DFMPipeline.from_pretrained(dfm_dir, quantization_config=config),
    ):
        with pytest.raises(ValueError, match=r"`quantization_config` is a BitsAndBytesConfig.*needs a CUDA GPU"):
            load()
