"""End-to-end pipeline seconds per sample with ``use_logits_to_keep=True`` (LM head only at the positions the step
reads) vs ``False`` (full logits, then the rows are selected); both with ``skip_idle_steps=True``.

A randomly initialised ``DFMForMaskedGeneration`` (vocab 32000, hidden 256, 4 layers, 4 heads, intermediate 704),
a 16-token random prompt given as ``input_ids``, 256 generated tokens, 64 steps of the default
``DiscreteFlowScheduler`` (linear kappa), batch 1, ``output_type="pt"``. Both settings use the same seed, so their
samples must also be equal.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    base_parser,
    emit,
    fmt_s,
    generator,
    print_header,
    random_pipeline,
    setup,
    time_alternating,
)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    setup(args)
    if args.quick:
        args.vocab, args.hidden, args.layers, args.intermediate = 4096, 64, 2, 176
        args.gen_length, args.steps = 32, 8
    rounds = args.repeats or (2 if args.quick else 5)
    model_cfg = dict(
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate
    )
    print_header(
        "pipeline seconds per sample, use_logits_to_keep True vs False (skip_idle_steps=True)",
        args.device,
        {
            **model_cfg,
            "prompt": args.prompt_length,
            "gen_length": args.gen_length,
            "steps": args.steps,
            "rounds": rounds,
        },
    )
    pipe = random_pipeline(
        **model_cfg, max_positions=args.prompt_length + args.gen_length, device=args.device, seed=args.seed
    )
    prompt = torch.randint(1, args.vocab - 1, (1, args.prompt_length), generator=generator("cpu", args.seed))
    outs: dict[bool, Any] = {}

    def run(keep: bool) -> None:
        outs[keep] = pipe(
            input_ids=prompt,
            gen_length=args.gen_length,
            num_inference_steps=args.steps,
            generator=generator(args.device, args.seed),
            output_type="pt",
            use_logits_to_keep=keep,
        )

    timing = time_alternating({"ours": lambda: run(True), "full": lambda: run(False)}, args.device, rounds)
    shape = f"vocab {args.vocab}, hidden {args.hidden}, gen {args.gen_length}, {args.steps} steps"
    emit(
        f"s/sample use_logits_to_keep=True vs False ({shape})",
        fmt_s(timing.times["ours"]),
        fmt_s(timing.times["full"]),
        timing.ratios["full"],
        "<=",
        0.75,
    )
    same = float((outs[True].sequences == outs[False].sequences).float().mean())
    emit("fraction of tokens equal, use_logits_to_keep=True vs False", "keep", "full", same, "==", 1.0)
    emit("model calls (nfe), use_logits_to_keep=True vs False", str(outs[True].nfe), str(outs[False].nfe), None)


if __name__ == "__main__":
    main()
