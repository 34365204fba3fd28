"""Peak memory of generating 8 x 1024 tokens with a 32k vocabulary vs the model's own single forward pass on the
same (8, 1024) input (full logits, as ``model(input_ids)`` returns them).

Each measurement runs in a fresh subprocess (see ``benchmarks/common.py``): the child builds the same randomly
initialised model (vocab 32000, hidden 256, 4 layers, 4 heads, intermediate 704, seed 0), warms up on a tiny input,
resets the kernel's peak-RSS counter and runs the measured call once. ``peak`` is the process's peak RSS during the
call (``VmHWM``); ``extra`` is that peak minus the RSS just before the call (interpreter, libraries and weights).
The generation is unconditional, ``num_inference_steps`` (default 8) steps of the default ``DiscreteFlowScheduler``
with ``skip_idle_steps`` and ``use_logits_to_keep``; fewer steps read more logit rows per step, so fewer is the harder
case.
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
    generator,
    peak_extra_bytes,
    print_header,
    random_pipeline,
    report_probe,
    run_probe,
    setup,
)


def probe(args: argparse.Namespace) -> None:
    """Child process: peak memory of one forward pass (``--probe forward``) or one generation (``generate``)."""
    pipe = random_pipeline(
        vocab=args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=4,
        intermediate=args.intermediate,
        max_positions=args.length,
        device=args.device,
        seed=args.seed,
    )
    model, mask = pipe.model, pipe.mask_token_id
    result: dict[str, Any] = {}
    if args.probe == "forward":
        ids = torch.full((args.batch, args.length), mask, dtype=torch.long, device=args.device)
        attention = torch.ones_like(ids)
        with torch.no_grad():
            model(input_ids=ids[:1, :16], attention_mask=attention[:1, :16])  # warm-up

            def run() -> None:
                result["logits_shape"] = list(model(input_ids=ids, attention_mask=attention).logits.shape)

            report_probe({**peak_extra_bytes(run, args.device), **result})
        return
    pipe(gen_length=16, num_inference_steps=2, generator=generator(args.device, 1), output_type="pt")  # warm-up

    def generate() -> None:
        out = pipe(
            gen_length=args.length,
            num_inference_steps=args.steps,
            num_samples_per_prompt=args.batch,
            generator=generator(args.device, args.seed),
            output_type="pt",
        )
        result["shape"], result["nfe"] = list(out.sequences.shape), out.nfe
        result["masks_left"] = int((out.sequences == mask).sum())

    report_probe({**peak_extra_bytes(generate, args.device), **result})


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--probe", choices=("forward", "generate"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args)
    if args.quick:
        args.batch, args.length, args.vocab, args.hidden, args.layers, args.intermediate = 2, 128, 2048, 64, 2, 176
    if args.probe:
        probe(args)
        return
    print_header(
        "peak memory: generation vs one forward pass, fresh subprocess each",
        args.device,
        {
            "batch": args.batch,
            "length": args.length,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
            "steps": args.steps,
        },
    )
    size_args = [
        *("--batch", str(args.batch), "--length", str(args.length), "--vocab", str(args.vocab)),
        *("--hidden", str(args.hidden), "--layers", str(args.layers), "--intermediate", str(args.intermediate)),
        *("--steps", str(args.steps), "--device", args.device, "--seed", str(args.seed)),
    ]
    fwd = run_probe(__file__, "forward", size_args)
    gen = run_probe(__file__, "generate", size_args)
    if gen["masks_left"]:
        raise SystemExit(f"generation left {gen['masks_left']} mask tokens")
    what = f"{args.batch}x{args.length} tokens, vocab {args.vocab}, {args.steps} steps (nfe {gen['nfe']})"
    emit(
        f"peak RSS generating {what} vs one forward pass",
        fmt_mib(gen["peak"]),
        fmt_mib(fwd["peak"]),
        gen["peak"] / fwd["peak"],
        "<=",
        1.5,
    )
    emit(
        "peak extra memory over the loaded model, generation vs one forward pass",
        fmt_mib(gen["extra"]),
        fmt_mib(fwd["extra"]),
        gen["extra"] / fwd["extra"],
        "<=",
        1.5,
    )


if __name__ == "__main__":
    main()
