"""Exact step caching: model calls (nfe) at ``num_inference_steps = 4 x gen_length`` with a time-agnostic model, and
identical samples to ``skip_idle_steps=False`` (which runs the full model at every step).

Mask source, batch 1, unconditional generation, a small randomly initialised ``DFMForMaskedGeneration``
(``time_conditioning=False``; its weights do not matter for the count). ``skip_idle_steps=True`` skips the model at
steps where the schedule moves no position (the posterior of a time-agnostic mask-source model is unchanged, so this is
exact); the two runs share a seed, and their sequences must be equal token for token.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    base_parser,
    emit,
    fmt_s,
    generator,
    print_header,
    random_pipeline,
    setup,
    time_call,
)

PRESETS = {"linear-euler": dict(kappa_exponent=1.0), "cubic-euler": dict(kappa_exponent=3.0)}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--steps-per-token", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    args = parser.parse_args()
    setup(args)
    if args.quick:
        args.gen_length = 32
    steps = args.steps_per_token * args.gen_length
    model_cfg = dict(vocab=args.vocab, hidden=64, layers=2, heads=4, intermediate=176)
    print_header(
        "exact caching (mask source, time-agnostic model, batch 1)",
        args.device,
        {"gen_length": args.gen_length, "num_inference_steps": steps, **model_cfg},
    )
    for name, sched_kwargs in PRESETS.items():
        pipe = random_pipeline(
            **model_cfg, max_positions=max(512, args.gen_length), device=args.device, seed=args.seed, **sched_kwargs
        )
        compare(pipe, name, args.gen_length, steps, args.device, args.seed)


def compare(pipe: Any, name: str, gen_length: int, steps: int, device: str, seed: int) -> None:
    """Run ``pipe`` with and without the cache from the same seed; print the nfe, equality and time lines."""
    outs: dict[bool, Any] = {}
    secs: dict[bool, float] = {}

    def run(skip_idle_steps: bool) -> None:
        outs[skip_idle_steps] = pipe(
            gen_length=gen_length,
            num_inference_steps=steps,
            generator=generator(device, seed),
            output_type="pt",
            skip_idle_steps=skip_idle_steps,
        )

    for skip_idle_steps in (True, False):
        secs[skip_idle_steps] = time_call(lambda skip_idle_steps=skip_idle_steps: run(skip_idle_steps), device)
    cached, full = outs[True], outs[False]
    assert full.nfe == steps, f"skip_idle_steps=False ran {full.nfe} model calls for {steps} steps"
    assert not bool((cached.sequences == pipe.mask_token_id).any()), "a mask token survived the last step"
    ratio = cached.nfe / steps
    emit(
        f"nfe / steps, {name}, gen {gen_length}, {steps} steps",
        f"nfe {cached.nfe}",
        f"{steps} steps",
        ratio,
        "<=",
        0.35,
    )
    same = float((cached.sequences == full.sequences).float().mean())
    emit(
        f"fraction of tokens equal to skip_idle_steps=False, {name}",
        "skip_idle_steps=True",
        "skip_idle_steps=False",
        same,
        "==",
        1.0,
    )
    emit(
        f"wall time skip_idle_steps=True vs False (one run each), {name}",
        fmt_s(secs[True]),
        fmt_s(secs[False]),
        secs[True] / secs[False],
    )


if __name__ == "__main__":
    main()
