"""Quantized loading: a LLaDA-format checkpoint converted and quantized on load (int8) against the bf16 load.

The checkpoint is LLaDA-8B-shaped and scaled down (random bf16 weights, LLaDA's tensor names and config keys,
sharded; default d_model 1024, 8 layers, mlp 2816, 32k rows: ~337 MB), written to a temporary folder by
``released_loading.write_checkpoints``. ``--quant`` picks the backend: ``torchao-int8`` (``TorchAoConfig(
Int8WeightOnlyConfig())``, CPU and GPU), ``bnb-8bit`` / ``bnb-4bit`` (``BitsAndBytesConfig``, ``--device cuda`` only).
The output head and the embedding stay in bf16 (transformers' quantizers keep the output embedding in full precision).

- Memory: each load runs in a fresh subprocess (``benchmarks/common.py``): imports and a warm-up load of a tiny
  checkpoint, then the peak counter is reset and the measured load runs once, followed by one read of every weight;
  ``extra`` is the peak RSS (CUDA: allocated memory) during that minus what was resident before. The model size is the
  bytes its parameters hold (a quantized weight counts its int data and scales).
- Speed: greedy generation through ``DFMPipeline`` (``ConfidenceUnmaskingScheduler``, temperature 0, blocks of 32),
  int8 and bf16 models alternating on the same prompts; tokens/s.
- Quality: on random token ids, the max |logit difference| (relative to the largest bf16 logit) and the fraction of
  positions whose arg-max token agrees, int8 vs bf16, beside bf16 vs float32 (what bf16 rounding alone does); and the
  fraction of greedily generated tokens equal between the int8 and bf16 pipelines (random weights give near-ties, so
  step-by-step generations drift apart even between bf16 and float32: that reference is printed too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    base_parser,
    emit,
    fmt_mib,
    fmt_s,
    peak_extra_bytes,
    print_header,
    report_probe,
    run_probe,
    setup,
    time_alternating,
)
from released_loading import write_checkpoints  # noqa: E402

QUANT_CHOICES = ("torchao-int8", "bnb-8bit", "bnb-4bit")


def quantization_config(quant: str) -> Any:
    """The transformers config of ``--quant``."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if quant == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    return BitsAndBytesConfig(**{f"load_in_{quant[4]}bit": True})


def load(folder: str, args: argparse.Namespace, variant: str) -> Any:
    """The checkpoint in ``folder`` loaded as ``variant``: ``"float32"``, ``"bf16"`` or ``"quantized"``."""
    from dfm_hf.models import DFMForMaskedGeneration

    dtype = torch.float32 if variant == "float32" else torch.bfloat16
    kwargs: dict[str, Any] = {"dtype": dtype}
    if variant == "quantized":
        kwargs["quantization_config"] = quantization_config(args.quant)
    if args.device != "cpu":
        kwargs["device_map"] = args.device
    return DFMForMaskedGeneration.from_pretrained(folder, **kwargs)


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao) counts its inner tensors (int data, scales)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(nbytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def probe(args: argparse.Namespace) -> None:
    """Child: warm-up load of the tiny checkpoint, then the measured load (``--probe bf16|quantized``)."""
    load(os.path.join(args.tiny, "llada"), args, args.probe)
    kept: dict[str, Any] = {}

    def load_and_touch() -> None:
        model = kept.setdefault("model", load(os.path.join(args.root, "llada"), args, args.probe))
        kept["checksum"] = sum(float(p.detach().reshape(-1)[::2048].float().sum()) for p in plain_params(model))

    start = time.perf_counter()
    result = peak_extra_bytes(load_and_touch, args.device)
    result["seconds"] = time.perf_counter() - start
    result["param_bytes"] = sum(nbytes(p) for p in kept["model"].parameters())
    report_probe(result)


def plain_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters as plain tensors one can read element-wise (a torchao weight through its int data)."""
    return [p.qdata if hasattr(p, "qdata") else p.data for p in model.parameters()]


def quality_and_speed(folder: str, args: argparse.Namespace) -> None:
    """Logit error, arg-max agreement, greedy-token agreement and tokens/s of the quantized model against bf16."""
    from dfm_hf.pipelines import DFMPipeline
    from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

    models = {variant: load(folder, args, variant).eval() for variant in ("float32", "bf16", "quantized")}
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab - 2, (args.batch, args.seq), generator=gen).to(args.device)
    with torch.no_grad():
        logits = {variant: model(ids).logits.float() for variant, model in models.items()}
    scale = float(logits["bf16"].abs().max())
    error = {v: float((logits[v] - logits["bf16"]).abs().max()) / scale for v in ("quantized", "float32")}
    argmax = {variant: value.argmax(-1) for variant, value in logits.items()}
    top = {v: float((argmax[v] == argmax["bf16"]).float().mean()) for v in ("quantized", "float32")}
    emit(
        f"max abs logit difference / max abs bf16 logit, {args.quant} vs bf16 (ours) and float32 vs bf16 (theirs), "
        f"random ids ({args.batch} x {args.seq})",
        f"{error['quantized']:.3g}",
        f"{error['float32']:.3g}",
        error["quantized"] / max(error["float32"], 1e-12),
    )
    emit(
        f"fraction of positions with the bf16 arg-max token, {args.quant} (ours) and float32 (theirs)",
        f"{top['quantized']:.3g}",
        f"{top['float32']:.3g}",
        top["quantized"] / max(top["float32"], 1e-12),
    )
    del logits
    mask = args.vocab - 1
    pipes = {}
    for variant, model in models.items():
        scheduler = ConfidenceUnmaskingScheduler(
            mask_token_id=mask, vocab_size=args.vocab, temperature=0.0, block_length=min(32, args.gen_length)
        )
        pipes[variant] = DFMPipeline(model=model, scheduler=scheduler)
        pipes[variant].set_progress_bar_config(disable=True)
    prompts = torch.randint(0, args.vocab - 2, (args.batch, 16), generator=gen).tolist()
    call = dict(input_ids=prompts, gen_length=args.gen_length, num_inference_steps=args.gen_length, output_type="pt")
    tokens = {variant: pipe(**call).sequences[:, 16:] for variant, pipe in pipes.items()}
    same = {v: float((tokens[v] == tokens["bf16"]).float().mean()) for v in ("quantized", "float32")}
    emit(
        f"fraction of greedy tokens equal to the bf16 pipeline's, {args.quant} (ours) and float32 (theirs), "
        f"gen {args.gen_length}, batch {args.batch}",
        f"{same['quantized']:.3g}",
        f"{same['float32']:.3g}",
        same["quantized"] / max(same["float32"], 1e-12),
    )
    timing = time_alternating(
        {"ours": lambda: pipes["quantized"](**call), "theirs": lambda: pipes["bf16"](**call)},
        args.device,
        rounds=args.repeats or 2,
    )
    produced = args.batch * args.gen_length
    emit(
        f"greedy tokens/s through DFMPipeline, {args.quant} vs bf16 (gen {args.gen_length}, batch {args.batch}, one "
        "model call a token)",
        f"{produced / timing.times['ours']:.1f} tok/s",
        f"{produced / timing.times['theirs']:.1f} tok/s",
        1.0 / timing.ratios["theirs"],
    )


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="torchao-int8")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64, help="length of the random ids the logits are compared on")
    parser.add_argument("--gen_length", type=int, default=16)
    parser.add_argument("--probe", choices=("bf16", "quantized"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args)
    if args.quant.startswith("bnb") and args.device != "cuda":
        raise SystemExit(f"--quant {args.quant}: bitsandbytes 4/8-bit runs on CUDA only; pass --device cuda")
    if args.quick:
        args.hidden, args.layers, args.heads, args.ffn, args.vocab, args.shards = 64, 2, 4, 176, 2048, 2
        args.seq, args.gen_length = 16, 8
    if args.probe:
        probe(args)
        return
    settings = ("quant", "hidden", "layers", "heads", "ffn", "vocab", "shards", "batch", "seq", "gen_length")
    print_header("quantized loading vs bf16", args.device, {k: getattr(args, k) for k in settings})
    root = tempfile.mkdtemp(prefix="dfm-quantized-")
    try:
        size = write_checkpoints(os.path.join(root, "big"), args)
        tiny = argparse.Namespace(**{**vars(args), "hidden": 32, "layers": 1, "heads": 4, "ffn": 64, "vocab": 256})
        tiny.shards = 1
        write_checkpoints(os.path.join(root, "tiny"), tiny)
        shutil.rmtree(os.path.join(root, "big", "llama"))
        passed = ["--root", os.path.join(root, "big"), "--tiny", os.path.join(root, "tiny"), "--quant", args.quant]
        passed += ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
        passed += ["--device", args.device]
        bf16 = run_probe(__file__, "bf16", passed)
        quantized = run_probe(__file__, "quantized", passed)
        what = f"a {fmt_mib(size)} bf16 LLaDA-format checkpoint ({args.shards} shards), converted on load"
        emit(
            f"peak extra memory loading {what}: {args.quant} vs bf16",
            fmt_mib(quantized["extra"]),
            fmt_mib(bf16["extra"]),
            quantized["extra"] / bf16["extra"],
            "<=",
            0.85,
        )
        emit(
            f"model size (parameter bytes, int data and scales included): {args.quant} vs bf16",
            fmt_mib(quantized["param_bytes"]),
            fmt_mib(bf16["param_bytes"]),
            quantized["param_bytes"] / bf16["param_bytes"],
            "<=",
            0.8,
        )
        emit(
            f"peak extra memory of the {args.quant} load vs its own model size (1 + one bf16 tensor: no full-precision "
            "copy is ever held)",
            fmt_mib(quantized["extra"]),
            fmt_mib(quantized["param_bytes"]),
            quantized["extra"] / quantized["param_bytes"],
            "<=",
            1.25,
        )
        emit(
            f"load time (+ one read of every weight): {args.quant} vs bf16",
            fmt_s(quantized["seconds"]),
            fmt_s(bf16["seconds"]),
            quantized["seconds"] / bf16["seconds"],
        )
        quality_and_speed(os.path.join(root, "big", "llada"), args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
