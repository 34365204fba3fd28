"""GPU smoke tests: skipped without CUDA (run them where a GPU is lent: ``python -m pytest -q tests/test_gpu.py``).

A CPU ``torch.Generator`` must drive a CUDA run (draws are made on the generator's device, then moved), and give the
same tokens as the CPU run with the same generators and the same dtypes (float32 model, float64 draws): the samplers
take the same decisions on every device, and a tiny float32 model's logits differ between the devices by rounding
only, far below the margins of its draws and rankings.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import tiny_pipeline

from dfm_hf import rng
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rng_helpers_with_cpu_and_cuda_generators():
    cuda = torch.device("cuda")
    assert rng.rand((4,), gen(0), cuda).device.type == "cuda"
    assert torch.equal(rng.rand((4,), gen(0), cuda).cpu(), rng.rand((4,), gen(0), "cpu"))
    g = torch.Generator(device="cuda").manual_seed(0)
    assert rng.rand((4,), g, "cpu").device.type == "cpu"
    positions = torch.ones(2, 3, dtype=torch.bool, device=cuda)
    assert rng.rand_at(positions, [gen(1), gen(2)]).device.type == "cuda"


@pytest.mark.parametrize("kind", ["flow-corrector", "uniform", "confidence-blocks"])
def test_pipeline_on_cuda_with_cpu_generators(kind):
    pipe = tiny_pipeline(seed=0)
    tok, vocab = pipe.tokenizer, pipe.model.config.vocab_size
    if kind == "flow-corrector":
        pipe.scheduler = DiscreteFlowScheduler(mask_token_id=tok.mask_token_id, vocab_size=vocab, corrector_alpha=2.0)
    elif kind == "uniform":
        pipe.scheduler = DiscreteFlowScheduler(
            source_distribution="uniform", mask_token_id=tok.mask_token_id, vocab_size=vocab
        )
    else:
        pipe.scheduler = ConfidenceUnmaskingScheduler(
            mask_token_id=tok.mask_token_id, vocab_size=vocab, block_length=4, temperature=1.0
        )
    kw = dict(gen_length=8, num_inference_steps=8, output_type="pt")
    prompts = ["def f():", "x = 1"]
    cpu_one, cpu_many = pipe(prompts, generator=gen(0), **kw), pipe(prompts, generator=[gen(0), gen(1)], **kw)
    pipe.to("cuda")
    assert next(pipe.model.parameters()).dtype == torch.float32
    one = pipe(prompts, generator=gen(0), **kw)  # a single CPU generator
    many = pipe(prompts, generator=[gen(0), gen(1)], **kw)
    assert one.sequences.device.type == "cpu" and not (many.sequences == tok.mask_token_id).any()
    assert torch.equal(one.sequences, cpu_one.sequences)
    assert torch.equal(many.sequences, cpu_many.sequences)
    assert one.nfe == cpu_one.nfe and many.nfe == cpu_many.nfe


def test_kv_cache_and_guidance_on_cuda():
    pipe = tiny_pipeline(seed=0)
    tok, vocab = pipe.tokenizer, pipe.model.config.vocab_size
    pipe.scheduler = ConfidenceUnmaskingScheduler(mask_token_id=tok.mask_token_id, vocab_size=vocab, block_length=4)
    kw = dict(gen_length=12, num_inference_steps=12, output_type="pt")
    on_cpu = pipe("def f(x):", generator=gen(0), **kw)
    pipe.to("cuda")
    exact = pipe("def f(x):", generator=gen(0), **kw)
    assert torch.equal(exact.sequences, on_cpu.sequences)
    for mode in ("prefix", "dual"):
        cached = pipe("def f(x):", kv_cache=mode, kv_cache_refresh_steps=1, generator=gen(0), **kw)
        assert torch.equal(cached.sequences, exact.sequences)
    guided = pipe("def f(x):", guidance_scale=2.0, kv_cache="dual", generator=gen(0), **kw)
    assert not (guided.sequences == tok.mask_token_id).any()


def test_training_step_on_cuda(tmp_path):
    pipe = tiny_pipeline(seed=0)
    model = pipe.model.to("cuda").train()
    ids = torch.randint(3, 300, (2, 16), device="cuda")
    labels = ids.clone()
    x_t = pipe.scheduler.add_noise(ids, torch.full_like(ids, pipe.tokenizer.mask_token_id), 0.5, generator=gen(0))
    labels[x_t == ids] = -100
    loss = model(input_ids=x_t, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None


def test_training_chooses_the_gpu():
    """``make_accelerator`` follows accelerate's device choice (a fresh process: accelerate's state is a singleton)."""
    code = (
        "import argparse; from dfm_hf.training.train import make_accelerator; "
        "a = make_accelerator(argparse.Namespace(mixed_precision='no', gradient_accumulation_steps=1)); "
        "print(a.device.type)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "cuda"


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_quantized_loading_on_cuda(bits, tmp_path):
    """A LLaDA-format checkpoint converted and quantized on load by bitsandbytes, and our saved format loaded the same
    way: the blocks' linear layers are bitsandbytes' 4/8-bit layers on the GPU, the model is smaller than in bf16,
    its logits stay close to the bf16 model's and the pipeline generates."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from dfm_hf import DFMForMaskedGeneration, DFMPipeline

    try:
        from . import conversion_helpers as ch
    except ImportError:
        import conversion_helpers as ch

    folder = str(tmp_path / "llada")
    ch.write_checkpoint(folder, ch.llada_tensors(ch.llama_source()), ch.llada_config())
    ch.save_tokenizer(ch.llada_tokenizer(), folder, drop_mask=True)
    config = BitsAndBytesConfig(**{f"load_in_{bits}bit": True}, bnb_4bit_compute_dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt

    def quantized_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
        linears = [m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]
        assert len(linears) == 7 * model.config.num_hidden_layers
        assert all(isinstance(m, layer) for m in linears)
        return linears

    ref = DFMForMaskedGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda")
    model = DFMForMaskedGeneration.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config)
    quantized_linears(model)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert model.get_memory_footprint() < ref.get_memory_footprint()
    ids = torch.randint(3, 380, (2, 12), generator=gen(0)).cuda()
    with torch.no_grad():
        ref_logits, logits = ref(ids).logits.float(), model(ids).logits.float()
    assert (logits - ref_logits).abs().max() <= 0.3 * ref_logits.abs().max()
    pipe = DFMPipeline.from_pretrained(folder, quantization_config=config)
    quantized_linears(pipe.model)
    out = pipe(input_ids=[[5, 6, 7, 8]], gen_length=8, num_inference_steps=8, output_type="pt")
    assert not (out.sequences == ch.LLADA_MASK).any()
    ref.save_pretrained(tmp_path / "ours")
    quantized_linears(DFMForMaskedGeneration.from_pretrained(tmp_path / "ours", quantization_config=config))
