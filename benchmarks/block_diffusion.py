"""Block diffusion: tokens/s of a block-diffusion model (``DFMConfig(block_size=K)``) sampled with its exact key/value
cache, against the same model without the cache and against a full-attention model of the same size and weights with
and without Fast-dLLM's approximate dual cache, all in one run from the same seeds.

Shapes (defaults): batch 8, a 256-token prompt, 256 generated tokens, block sizes 8 and 32, 256 steps (one token per
step), greedy ``ConfidenceUnmaskingScheduler``, without and with ``confidence_threshold=0.9``. Models: random weights
on the body of the bundled small model (``dfm-code-stdlib``: hidden 256, 4 layers, vocabulary 4096; ``small``) and on
the same body with a 32k vocabulary (``random``). The full-attention model decodes in blocks of ``K`` too (LLaDA's
semi-autoregressive schedule, ``block_length=K``). No EOS: every row generates all its tokens.

Lines, per model and block size:

* tokens/s of the cached block model vs the same model with ``kv_cache=None`` (target >= 4x at ``K = 8``);
* vs the full-attention model with ``kv_cache="dual"`` (target >= 1: the exact cache beats the approximate one),
  and with ``kv_cache=None`` (INFO); with the threshold, the cached block model vs dual with the same threshold;
* exactness: the largest logit difference between the last block read against the cache and the full forward
  (target <= 1e-4 in float32), and the fraction of tokens equal with and without the cache (INFO: the two paths
  compute the same sums in different orders, so a near-tie of a random model's confidences can flip);
* memory: the keys and values the block cache holds at its largest (every layer, the whole sequence), and the peak
  extra memory of a cached generation against one full forward of the same batch (fresh subprocesses).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    base_parser,
    emit,
    fmt_mib,
    fmt_s,
    generator,
    peak_extra_bytes,
    print_header,
    random_pipeline,
    report_probe,
    run_probe,
    setup,
    time_alternating,
)

#: run name -> (block model?, kv_cache, threshold?)
RUNS = {
    "block": (True, "auto", False),
    "block-uncached": (True, None, False),
    "full": (False, None, False),
    "full-dual": (False, "dual", False),
    "block+threshold": (True, "auto", True),
    "full-dual+threshold": (False, "dual", True),
}
UNCACHED_TARGET = {8: 4.0}  # block size -> target speed-up of the cache over kv_cache=None
ERROR_TARGET = 1e-4  # largest logit difference between a cached and a full forward (float32)
SIZE_ARGS = ("vocab", "batch", "prompt_length", "gen_length", "seed", "device")


def load(name: str, block_size: Any, args: Any) -> Any:
    """A random pipeline on the small model's body (``small``: its vocabulary; ``random``: ``--vocab``)."""
    from dfm_hf.bundles.shipped import small_model_path
    from dfm_hf.models import DFMConfig

    c = DFMConfig.from_pretrained(os.path.join(small_model_path(), "model"))
    return random_pipeline(
        vocab=c.vocab_size if name == "small" else args.vocab,
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        heads=c.num_attention_heads,
        intermediate=c.intermediate_size,
        max_positions=max(c.max_position_embeddings, args.prompt_length + args.gen_length),
        device=args.device,
        seed=args.seed,
        block_size=block_size,
    )


def prompts_for(pipe: Any, args: Any) -> torch.Tensor:
    """(batch, prompt_length) random ids (never the mask, pad or a special id)."""
    g = generator("cpu", args.seed)
    return torch.randint(3, pipe.model.config.vocab_size - 1, (args.batch, args.prompt_length), generator=g)


def scheduler_for(pipe: Any, block_length: Any, threshold: Any) -> Any:
    """Greedy confidence unmasking (``block_length`` None: the block model's own blocks)."""
    from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

    return ConfidenceUnmaskingScheduler(
        mask_token_id=pipe.mask_token_id,
        vocab_size=pipe.model.config.vocab_size,
        temperature=0.0,
        block_length=block_length,
        confidence_threshold=threshold,
    )


def probe(args: Any) -> None:
    """Child process: peak extra memory of a cached block generation (``--probe generate``) or of one full forward
    of the whole sequence (``--probe forward``, which also reports the bytes of the cache it builds)."""
    pipe = load(args.model, args.block_size, args)
    ids = prompts_for(pipe, args).to(args.device)
    kept: dict[str, Any] = {}
    if args.probe == "generate":
        pipe.scheduler = scheduler_for(pipe, None, None)

        def run() -> None:
            pipe(input_ids=ids, gen_length=args.gen_length, num_inference_steps=args.steps, output_type="pt")

    else:
        x = torch.cat([ids, torch.full((ids.shape[0], args.gen_length), pipe.mask_token_id, device=ids.device)], 1)
        nothing = torch.zeros_like(x, dtype=torch.bool)

        def run() -> None:
            with torch.no_grad():
                kept["cache"] = pipe.model(input_ids=x, use_cache=True, logits_to_keep=nothing).past_key_values

    run()  # warm-up
    kept.clear()
    result = peak_extra_bytes(run, args.device)
    if "cache" in kept:
        layers = kept["cache"].layers
        result["held"] = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    report_probe(result)


def cache_error(pipe: Any, prompts: torch.Tensor, generated: torch.Tensor, block_size: int) -> tuple[float, float]:
    """``(max |difference|, max |logit|)`` between the logits of the last block of ``[prompts | generated]`` run as
    queries against a ``DynamicCache`` of everything before it and the same logits from one full forward."""
    from transformers import DynamicCache

    x = torch.cat([prompts, generated], 1).to(pipe.model.device)
    start, end = x.shape[1] - block_size, x.shape[1]
    positions = torch.arange(end, device=x.device).expand(x.shape[0], end)
    with torch.no_grad():
        full = pipe.model(input_ids=x).logits[:, start:end]
        cache = DynamicCache()
        pipe.model(input_ids=x[:, :start], position_ids=positions[:, :start], past_key_values=cache, logits_to_keep=1)
        cached = pipe.model(input_ids=x[:, start:], position_ids=positions[:, start:], past_key_values=cache).logits
    return float((cached - full).abs().max()), float(full.abs().max())


def compare(name: str, block_size: int, args: Any, rounds: int) -> None:
    """Every run of :data:`RUNS` for one model and block size, timed alternately; then the result lines."""
    pipes = {True: load(name, block_size, args), False: load(name, None, args)}
    ids = prompts_for(pipes[True], args)
    outs: dict[str, Any] = {}

    def make(run: str) -> Any:
        is_block, cache, thresholded = RUNS[run]
        pipe = pipes[is_block]
        sched = scheduler_for(pipe, None if is_block else block_size, args.threshold if thresholded else None)

        def call() -> None:
            pipe.scheduler = sched
            outs[run] = pipe(
                input_ids=ids,
                gen_length=args.gen_length,
                num_inference_steps=args.steps,
                kv_cache=cache,
                output_type="pt",
                return_full_text=False,
            )

        return call

    for pipe in pipes.values():  # warm-up at a small size (allocator, kernels), not timed
        pipe.scheduler = scheduler_for(pipe, None if pipe is pipes[True] else block_size, None)
        pipe(input_ids=ids[:, :block_size], gen_length=2 * block_size, num_inference_steps=4, output_type="pt")
    timing = time_alternating({run: make(run) for run in RUNS}, args.device, rounds, warmup=0, reference="block")
    tokens = args.batch * args.gen_length
    speedup = {run: 1.0 / ratio for run, ratio in timing.ratios.items()}  # median of other / block per round

    def tps(run: str) -> str:
        return f"{tokens / timing.times[run]:.1f} tok/s ({fmt_s(timing.times[run])}, nfe {outs[run].nfe})"

    label = f"{name} K={block_size}"
    target = UNCACHED_TARGET.get(block_size)
    emit(
        f"{label}: tokens/s block model, exact cache vs the same model with kv_cache=None",
        tps("block"),
        tps("block-uncached"),
        speedup["block-uncached"],
        ">=" if target else None,
        target or 0.0,
    )
    emit(
        f"{label}: tokens/s block model, exact cache vs full attention kv_cache='dual' (approximate)",
        tps("block"),
        tps("full-dual"),
        speedup["full-dual"],
        ">=",
        1.0,
    )
    emit(
        f"{label}: tokens/s block model, exact cache vs full attention kv_cache=None",
        tps("block"),
        tps("full"),
        speedup["full"],
    )
    ratio = timing.times["full-dual+threshold"] / timing.times["block+threshold"]
    emit(
        f"{label}: tokens/s with confidence_threshold={args.threshold}, block model exact cache vs full attention dual",
        tps("block+threshold"),
        tps("full-dual+threshold"),
        ratio,
        ">=",
        1.0,
    )
    for run in RUNS:
        assert not bool((outs[run].sequences == pipes[True].mask_token_id).any()), run
    error, scale = cache_error(pipes[True], ids, outs["block"].sequences, block_size)
    emit(
        f"{label}: max |logit difference| of the last block read against the cache vs the full forward",
        f"{error:.2e}",
        f"logits up to {scale:.2f}",
        error,
        "<=",
        ERROR_TARGET,
    )
    same = (outs["block"].sequences == outs["block-uncached"].sequences).float().mean().item()
    emit(
        f"{label}: fraction of tokens equal, exact cache vs kv_cache=None (float rounding may flip a near-tie)",
        f"{same:.3f}",
        "1.000",
        same,
    )
    agree = (outs["full-dual"].sequences == outs["full"].sequences).float().mean().item()
    emit(f"{label}: fraction of tokens equal, full attention dual vs kv_cache=None", f"{agree:.3f}", "1.000", agree)
    if args.no_memory:
        return
    size = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SIZE_ARGS]
    size += [f"--model={name}", f"--block-size={block_size}", f"--steps={args.steps}"]
    forward = run_probe(__file__, "forward", size)
    generate = run_probe(__file__, "generate", size)
    emit(
        f"{label}: keys and values the block cache holds at its largest vs peak extra memory of one full forward",
        fmt_mib(forward["held"]),
        fmt_mib(forward["extra"]),
        forward["held"] / max(forward["extra"], 1),
    )
    emit(
        f"{label}: peak extra memory of a cached block generation vs one full forward",
        fmt_mib(generate["extra"]),
        fmt_mib(forward["extra"]),
        generate["extra"] / max(forward["extra"], 1),
    )


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=("small", "random", "both"))
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the random model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-sizes", default="8,32", help="comma-separated block sizes")
    parser.add_argument("--steps", type=int, default=None, help="default: --gen-length (one token per step)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--block-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe", choices=("forward", "generate"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args)
    if args.quick:
        args.batch, args.prompt_length, args.gen_length, args.block_sizes, args.vocab = 2, 24, 16, "4,8", 4096
    args.steps = args.steps or args.gen_length
    if args.probe:
        return probe(args)
    sizes = [int(s) for s in args.block_sizes.split(",")]
    if any(args.gen_length % k or args.prompt_length % k for k in sizes):
        raise SystemExit("--gen-length and --prompt-length must be multiples of every block size")
    rounds = args.repeats or 1
    names = ["small", "random"] if args.model == "both" else [args.model]
    print_header(
        "block diffusion: the exact block cache vs no cache and vs full attention (dual cache)",
        args.device,
        {k: getattr(args, k) for k in ("batch", "prompt_length", "gen_length", "block_sizes", "steps", "threshold")}
        | {"vocab (random)": args.vocab, "rounds": rounds, "threads": torch.get_num_threads()},
    )
    for name in names:
        for block_size in sizes:
            compare(name, block_size, args, rounds)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
