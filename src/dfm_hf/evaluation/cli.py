"""``dfm-hf evaluate``: sweep tasks x scheduler presets x NFE and write results.csv, results.md and plots.

    dfm-hf evaluate --model runs/dfm --tasks genppl stdlib_infill --nfe 8 16 32 64 \\
        --presets linear-euler cubic-euler cubic-corrector --num_samples 1 --output_dir runs/eval
    torchrun --nproc_per_node 2 examples/evaluate.py --model runs/dfm ...     (each process generates a shard)

A cell is one (task, preset, nfe). Cells already in ``<output_dir>/results.csv`` are skipped, and the files are
rewritten atomically after every cell, so an interrupted sweep resumes where it stopped. Every output row draws
from its own generator seeded by (seed, task, example, sample), and the work is cut into fixed chunks of examples
dealt round-robin to the processes: the numbers do not depend on the number of processes. The main process gathers
the generated spans (``accelerate.utils.gather_object``), scores them (programs run in
:mod:`dfm_hf.evaluation.sandbox`) and writes the files. The modules: :mod:`.sweep` (the loop over cells),
:mod:`.generators`, :mod:`.scoring`, :mod:`.results` (files and plots).

``--model`` may also be a causal LM folder (e.g. the GPT-2 of ``examples/train_ar_baseline.py``): it is evaluated
left to right with presets ``ar-sample`` (temperature 1) / ``ar-greedy``; infilling then sees only the prefix.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Optional

from .sweep import DEFAULT_PRESETS, run_sweep
from .tasks import TASKS

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``dfm-hf evaluate`` / ``examples/evaluate.py``."""
    p = argparse.ArgumentParser(prog="dfm-hf evaluate", description="Sweep tasks x presets x NFE for a DFM pipeline.")
    p.add_argument(
        "--model",
        default=None,
        help="pipeline folder, Hub id or causal LM folder (dfm-hf evaluate: default the bundled model)",
    )
    p.add_argument("--tasks", nargs="+", default=["genppl", "stdlib_infill"], choices=TASKS)
    p.add_argument("--nfe", nargs="+", type=int, default=[16, 32, 64], help="sampling steps (num_inference_steps)")
    p.add_argument(
        "--presets", nargs="+", default=None, help=f"scheduler presets (default {' '.join(DEFAULT_PRESETS)})"
    )
    p.add_argument("--num_samples", type=int, default=1, help="samples per problem (HumanEval, infilling)")
    p.add_argument("--max_examples", type=int, default=None, help="problems per task (default: all; stdlib 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--judge", default="none", help="genppl judge: smollm2 | a causal LM folder | none")
    p.add_argument("--gen_length", type=int, default=128, help="tokens generated for HumanEval completion")
    p.add_argument("--context_tokens", type=int, default=None, help="model input cap (default: its max positions)")
    p.add_argument("--infill_lines", type=int, default=1, help="consecutive lines masked by the infilling tasks")
    p.add_argument("--genppl_samples", type=int, default=64, help="unconditional samples for genppl")
    p.add_argument("--genppl_length", type=int, default=128, help="tokens per unconditional sample")
    p.add_argument("--batch_size", type=int, default=32, help="rows per model call")
    p.add_argument("--pass_k", nargs="+", type=int, default=[1, 10])
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per sandboxed program")
    p.add_argument("--device", default=None, help="default: the accelerator's device")
    p.add_argument(
        "--num_threads", type=int, default=None, help="torch CPU threads per process (1 is much faster on a busy box)"
    )
    p.add_argument("--no_plots", action="store_true")
    return p


def _validate(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the first flag out of its range, with the range."""
    for name in ("num_samples", "gen_length", "infill_lines", "genppl_samples", "genppl_length", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"`--max_examples` must be >= 1, got {args.max_examples}")
    if args.context_tokens is not None and args.context_tokens < 2:
        raise ValueError(f"`--context_tokens` must be >= 2, got {args.context_tokens}")
    if any(n < 1 for n in args.nfe):
        raise ValueError(f"`--nfe` values must be >= 1, got {args.nfe}")
    if any(k < 1 for k in args.pass_k) or min(args.pass_k) > args.num_samples:
        raise ValueError(f"`--pass_k` values must be >= 1, one at most --num_samples, got {args.pass_k}")
    if args.num_threads is not None and args.num_threads < 1:
        raise ValueError(f"`--num_threads` must be >= 1, got {args.num_threads}")
    if not args.timeout > 0:
        raise ValueError(f"`--timeout` must be > 0, got {args.timeout}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"`--output_dir` {args.output_dir!r} is a file")


def main(argv: Optional[Sequence[str]] = None, default_model: Optional[Callable[[], str]] = None) -> int:
    """Entry point of ``dfm-hf evaluate``.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).
        default_model: called for the model path when ``--model`` is not given; None makes ``--model`` required.

    Raises:
        ValueError: bad input, named (the dfm-hf CLI turns it into exit code 2).
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _validate(args)
    if args.model is None:
        if default_model is None:
            raise ValueError("`--model` is required: a DFM pipeline folder or Hub id, or a causal LM folder")
        args.model = default_model()
    run_sweep(args)
    return 0
