"""Fast block-wise sampling, side by side in one run: the approximate key/value cache (``kv_cache="prefix"`` /
``"dual"``) and threshold parallel decoding against the exact block path (``kv_cache=None``, same scheduler) and
against diffusers' ``LLaDA2Pipeline`` on the same weights.

Shapes (the issue's): batch 8, a 256-token prompt, 256 generated tokens, blocks of 32, 256 steps (one token per step),
greedy ``ConfidenceUnmaskingScheduler`` (LLaDA's low-confidence remasking); ``confidence_threshold=0.9`` for the
threshold line. Models: the small bundled DFM model (vocabulary 4096) and a random model of the same shape with a 32k
vocabulary (``--model``; also ``default``, the adapted SmolLM2 model, or any pipeline folder, at smaller shapes).
Lines:

* tokens/s of each mode vs the exact block path (targets: dual + threshold >= 5x, dual >= 2.5x) and vs
  ``LLaDA2Pipeline`` (INFO); timings alternate in the same process (``benchmarks/common.py``);
* nfe of each cache mode vs the exact block path (target <= 1: the forward that builds the cache when a block opens
  gives that step's logits, so a step that reads logits costs one forward, as on the exact path);
* quality: greedy token agreement with the exact path, and with ``--judge`` the generative
  perplexity / mean unigram entropy of the generated texts from the SmolLM2 judge (``dfm_hf.evaluation.judge``, the
  judge of ``dfm-hf evaluate``);
* memory: bytes held by the cache (every layer's keys and values) against the peak extra memory of one full forward
  pass of the same batch.
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
from vs_llada2 import LLaDA2Adapter  # noqa: E402

MODES = {
    "exact": dict(kv_cache=None),
    "prefix": dict(kv_cache="prefix"),
    "dual": dict(kv_cache="dual"),
    "dual+threshold": dict(kv_cache="dual", threshold=True),
}
TARGETS = {"dual": 2.5, "dual+threshold": 5.0}
SIZE_ARGS = ("vocab", "batch", "prompt_length", "gen_length", "seed", "device")


def _load(name: str, args: Any) -> Any:
    """The small bundled pipeline (``small``), the default model (``default``: the adapted SmolLM2 model when its base
    is installed), a pipeline folder, or a random model of the small model's shape with ``--vocab`` tokens
    (``random``)."""
    from dfm_hf.bundles.shipped import bundled_model_path, small_model_path
    from dfm_hf.pipelines import DFMPipeline

    total = args.prompt_length + args.gen_length
    if name != "random":
        folder = {"small": small_model_path, "default": bundled_model_path}.get(name, lambda: name)()
        pipe = DFMPipeline.from_pretrained(folder).to(args.device)
        if pipe.model.config.max_position_embeddings < total:
            raise SystemExit(f"{name} holds {pipe.model.config.max_position_embeddings} positions < {total}")
        pipe.set_progress_bar_config(disable=True)
        return pipe
    c = DFMPipeline.from_pretrained(small_model_path()).model.config
    return random_pipeline(
        vocab=args.vocab,
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        heads=c.num_attention_heads,
        intermediate=c.intermediate_size,
        max_positions=total,
        device=args.device,
        seed=args.seed,
    )


def _prompts(pipe: Any, args: Any) -> torch.Tensor:
    """(batch, prompt_length) ids: held-out-free real code for the bundled model, random ids otherwise."""
    g = generator("cpu", args.seed)
    if pipe.tokenizer is None:
        return torch.randint(3, pipe.model.config.vocab_size - 1, (args.batch, args.prompt_length), generator=g)
    import glob

    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "json", "*.py")))
    ids = pipe.tokenizer("\n".join(open(f, encoding="utf-8").read() for f in files), add_special_tokens=False)
    ids = torch.tensor(ids["input_ids"])
    starts = torch.randint(0, ids.numel() - args.prompt_length, (args.batch,), generator=g)
    return torch.stack([ids[s : s + args.prompt_length] for s in starts.tolist()])


def _probe(args: Any) -> None:
    """Child process (``--probe forward|cache``): peak extra memory of one full forward of ``[prompt | masks]``,
    without (``forward``) or with (``cache``) ``use_cache=True``; the cache reports the bytes it holds too."""
    pipe = _load(args.model, args)
    prompts = _prompts(pipe, args)
    x = torch.cat([prompts, torch.full((prompts.shape[0], args.gen_length), pipe.mask_token_id)], 1)
    x = x.to(pipe.model.device)
    nothing = torch.zeros_like(x, dtype=torch.bool)
    kept: dict[str, Any] = {}

    def run() -> None:
        with torch.no_grad():
            out = pipe.model(input_ids=x, use_cache=args.probe == "cache", logits_to_keep=nothing)
            kept["cache"] = out.past_key_values

    run()  # warm-up
    kept.clear()
    result = peak_extra_bytes(run, args.device)
    cache = kept.get("cache")
    if cache is not None:
        result["held"] = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    report_probe(result)


_JUDGE: dict[str, Any] = {}


def _judge(texts: list[str], device: str) -> tuple[float, float]:
    """(generative perplexity, mean unigram entropy) of ``texts`` from the SmolLM2 judge (loaded once)."""
    import dfm_hf.evaluation.metrics
    from dfm_hf.evaluation.judge import load_smollm2_judge

    if not _JUDGE:
        _JUDGE["model"], _JUDGE["tokenizer"] = load_smollm2_judge(device)
        _JUDGE["metric"] = dfm_hf.evaluation.metrics.load("generative_perplexity")
    out = _JUDGE["metric"].compute(
        predictions=texts, model=_JUDGE["model"], tokenizer=_JUDGE["tokenizer"], device=device
    )
    return out["mean_perplexity"], out["mean_entropy"]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="both",
        help="small (the 4M model in the package), default (the default model), random, both, or a pipeline folder",
    )
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the random model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--no-llada2", action="store_true", help="skip diffusers' LLaDA2Pipeline")
    parser.add_argument("--judge", action="store_true", help="generative perplexity of each mode (SmolLM2 judge)")
    parser.add_argument("--probe", choices=("forward", "cache"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args)
    if args.probe:
        return _probe(args)
    if args.quick:
        args.batch, args.prompt_length, args.gen_length, args.block_length, args.steps = 2, 32, 32, 8, 32
        args.vocab = 4096
    rounds = args.repeats or (1 if args.quick else 2)
    blocks = args.gen_length // args.block_length
    if args.gen_length % args.block_length or args.steps % blocks:
        raise SystemExit("--gen-length must be a multiple of --block-length, --steps a multiple of the blocks")

    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

    names = ["small", "random"] if args.model == "both" else [args.model]
    print_header(
        "fast block-wise sampling: approximate KV cache and threshold decoding vs the exact block path",
        args.device,
        {k: getattr(args, k) for k in ("batch", "prompt_length", "gen_length", "block_length", "steps", "threshold")}
        | {"rounds": rounds, "threads": torch.get_num_threads()},
    )
    for name in names:
        pipe = _load(name, args)
        mask, vocab = pipe.mask_token_id, pipe.model.config.vocab_size
        base = ConfidenceUnmaskingScheduler(
            mask_token_id=mask, vocab_size=vocab, block_length=args.block_length, temperature=0.0
        )
        thresholded = ConfidenceUnmaskingScheduler.from_config(base.config, confidence_threshold=args.threshold)
        prompts = _prompts(pipe, args)
        print(f"# model {name}: vocab {vocab}, {sum(p.numel() for p in pipe.model.parameters()) / 1e6:.1f}M params")
        outs: dict[str, Any] = {}

        def ours(mode: str, pipe: Any = pipe, base: Any = base, thresholded: Any = thresholded, outs: Any = outs,
                 prompts: torch.Tensor = prompts) -> None:  # fmt: skip
            spec = MODES[mode]
            pipe.scheduler = thresholded if spec.get("threshold") else base
            outs[mode] = pipe(
                input_ids=prompts,
                gen_length=args.gen_length,
                num_inference_steps=args.steps,
                kv_cache=spec["kv_cache"],
                output_type="pt",
                return_full_text=False,
            )

        fns: dict[str, Any] = {m: (lambda m=m: ours(m)) for m in MODES}
        if not args.no_llada2:
            adapter = LLaDA2Adapter(pipe.model)
            theirs = LLaDA2Pipeline(model=adapter, scheduler=BlockRefinementScheduler(block_length=args.block_length))
            theirs.set_progress_bar_config(disable=True)

            def llada2(
                outs: Any = outs, theirs: Any = theirs, prompts: torch.Tensor = prompts, mask: int = mask
            ) -> None:
                outs["llada2"] = theirs(
                    input_ids=prompts.to(args.device),
                    gen_length=args.gen_length,
                    block_length=args.block_length,
                    num_inference_steps=args.steps // blocks,
                    mask_token_id=mask,
                    eos_token_id=None,
                    generator=generator(args.device, args.seed),
                    output_type="seq",
                )

            fns["llada2"] = llada2
        timing = time_alternating(fns, args.device, rounds, warmup=0, reference="exact")
        tokens = args.batch * args.gen_length
        exact_tps = tokens / timing.times["exact"]
        for mode in MODES:
            if mode == "exact":
                continue
            assert not bool((outs[mode].sequences == mask).any()), mode
            emit(
                f"{name}: tokens/s {mode} (nfe {outs[mode].nfe}) vs exact block path (nfe {outs['exact'].nfe})",
                f"{tokens / timing.times[mode]:.1f} tok/s ({fmt_s(timing.times[mode])})",
                f"{exact_tps:.1f} tok/s ({fmt_s(timing.times['exact'])})",
                timing.ratios[mode],
                ">=" if mode in TARGETS else None,
                TARGETS.get(mode, 0.0),
            )
        for mode in MODES:
            if mode != "exact":  # the forward that builds the cache gives its step's logits: no extra forward
                emit(
                    f"{name}: nfe of {mode} vs the exact block path (one forward per step that reads logits)",
                    str(outs[mode].nfe),
                    str(outs["exact"].nfe),
                    outs[mode].nfe / outs["exact"].nfe,
                    "<=",
                    1.0,
                )
        if "llada2" in fns:
            theirs_tps = tokens / timing.times["llada2"]
            for mode in MODES:
                emit(
                    f"{name}: tokens/s {mode} vs diffusers LLaDA2Pipeline (same weights, {args.steps // blocks} "
                    "steps per block)",
                    f"{tokens / timing.times[mode]:.1f} tok/s",
                    f"{theirs_tps:.1f} tok/s",
                    timing.times["llada2"] / timing.times[mode],
                    None,
                    0.0,
                )
        exact = outs["exact"].sequences
        for mode in MODES:
            if mode != "exact":
                same = (outs[mode].sequences == exact).float().mean().item()
                emit(f"{name}: greedy token agreement of {mode} with the exact path", f"{same:.3f}", "1.000",
                     same, None, 0.0)  # fmt: skip
        if args.judge and pipe.tokenizer is not None:
            for mode in MODES:
                texts = pipe.tokenizer.batch_decode(outs[mode].sequences.tolist(), skip_special_tokens=True)
                ppl, entropy = _judge(texts, args.device)
                emit(f"{name}: SmolLM2 gen-ppl / entropy of {mode}", f"{ppl:.1f} / {entropy:.2f}", "-", ppl, None, 0.0)
        size = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SIZE_ARGS] + [f"--model={name}"]
        forward = run_probe(__file__, "forward", size)
        cached = run_probe(__file__, "cache", size)
        emit(
            f"{name}: memory held by the cache (every layer's keys and values) vs peak extra memory of one forward",
            fmt_mib(cached["held"]),
            fmt_mib(forward["extra"]),
            cached["held"] / max(forward["extra"], 1),
            None,
            0.0,
        )
        emit(
            f"{name}: peak extra memory of a forward that builds the cache vs one without",
            fmt_mib(cached["extra"]),
            fmt_mib(forward["extra"]),
            cached["extra"] / max(forward["extra"], 1),
            None,
            0.0,
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
