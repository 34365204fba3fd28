"""`dfm-hf`: command line for generation, infilling, training and evaluation.

    dfm-hf generate "def fibonacci(n):"
    dfm-hf generate --infill "def add(a, b):\n    return <|fill|>\n"
    dfm-hf generate --stream "def fibonacci(n):"         (draws the canvas denoising live on stderr)
    dfm-hf train --stdlib --output_dir runs/dfm ...      (the flags of examples/train_dfm.py)
    dfm-hf evaluate --model runs/dfm ...                 (the flags of examples/evaluate.py)
    dfm-hf lm-eval --model_args pretrained=runs/dfm --tasks stdlib_next_line   (lm-eval's flags; extra `eval`)

Generated text goes to stdout, progress bars and messages to stderr. Exit codes: 0 success, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .bundles.shipped import require_bundled_model

__all__ = ["FILL_MARKER", "generate", "main"]

FILL_MARKER = "<|fill|>"


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfm-hf generate", description="Complete or infill code with a DFM pipeline.")
    p.add_argument(
        "prompt", nargs="?", default="", help="prefix to complete (\\n and \\t are unescaped; - reads stdin)"
    )
    p.add_argument("--infill", action="store_true", help=f"fill holes marked {FILL_MARKER} or the mask token")
    p.add_argument("--fill-length", type=int, default=12, help=f"tokens generated per {FILL_MARKER} marker")
    p.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the bundled model)")
    p.add_argument("--revision", default=None)
    p.add_argument("--scheduler-preset", default=None, help="e.g. cubic-euler, cubic-corrector, confidence-blocks")
    p.add_argument("--num-inference-steps", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=None, help="tokens appended (default 64; 0 with --infill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--stream", action="store_true", help="draw the canvas live on stderr while it denoises (masks shown as ░)"
    )
    return p


def generate(argv: Optional[list[str]] = None) -> int:
    """``dfm-hf generate``: print each sample to stdout, separated by a blank line when there are several."""
    args = _generate_parser().parse_args(argv)
    import torch

    from .pipelines import DFMPipeline

    model = args.model or require_bundled_model()
    if args.model is not None and os.path.exists(model) and not os.path.isdir(model):
        raise ValueError(f"`--model` {model!r} is a file; pass a pipeline folder or a Hub repo id.")
    for name in ("num_inference_steps", "num_samples", "fill_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}.")
    kwargs = {"revision": args.revision} if args.revision else {}
    try:
        pipe = DFMPipeline.from_pretrained(model, **kwargs)
    except Exception as e:  # a missing folder, an unreachable or unknown Hub id, a broken checkpoint
        raise ValueError(f"`--model` {model!r} could not be loaded as a DFM pipeline: {type(e).__name__}: {e}") from e
    pipe.to(args.device)
    if args.scheduler_preset:
        try:
            pipe.load_scheduler_preset(args.scheduler_preset)
        except ValueError as e:
            raise ValueError(f"`--scheduler-preset` {args.scheduler_preset!r}: {e}") from e
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    gen_length = args.gen_length
    if args.infill:
        prompt = prompt.replace(FILL_MARKER, pipe.tokenizer.mask_token * args.fill_length)
        if pipe.tokenizer.mask_token not in prompt:
            raise ValueError(f"`--infill` needs a {FILL_MARKER} marker or the mask token in the prompt.")
        gen_length = 0 if gen_length is None else gen_length
    gen_length = 64 if gen_length is None else gen_length
    pipe.set_progress_bar_config(file=sys.stderr, leave=False, disable=args.stream)
    streamer = None
    if args.stream:
        from .generation.streamers import TerminalStreamer

        streamer = TerminalStreamer(pipe.tokenizer, mask_token_id=pipe.mask_token_id)
    out = pipe(
        prompt or None,
        gen_length=gen_length,
        num_inference_steps=args.num_inference_steps,
        num_samples_per_prompt=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed),
        streamer=streamer,
    )
    sys.stdout.write("\n\n".join(out.texts) + "\n")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``dfm-hf``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("generate", "train", "evaluate", "lm-eval")
    if not argv or argv[0] not in commands:
        print(f"usage: dfm-hf {{{','.join(commands)}}} [options]  (dfm-hf COMMAND --help)", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "generate":
            return generate(rest)
        if command == "train":
            from .training.train import main as train_main

            train_main(rest)
            return 0
        if command == "lm-eval":
            try:
                from .evaluation.harness_cli import cli_main
            except ImportError as e:
                raise ValueError(str(e)) from e  # names the extra to install
            return cli_main(rest, default_model=require_bundled_model)
        from .evaluation.cli import main as evaluate_main

        return evaluate_main(rest, default_model=require_bundled_model) or 0
    except ValueError as e:
        print(f"dfm-hf {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
