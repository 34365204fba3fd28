"""``dfm-hf lm-eval``: lm-evaluation-harness's own command line with ``--model dfm_hf`` and the shipped tasks."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from . import harness  # registers the "dfm_hf" model with lm-eval
from .lm_eval_tasks import TAG, TASK_NAMES, TASKS_PATH

__all__ = ["cli_main"]

_USAGE = f"""usage: dfm-hf lm-eval [--model_args pretrained=PATH_OR_HUB_ID,mc_num=N,...] --tasks TASK [...]
                      [lm-eval options]

Runs lm-eval's `run` with --model dfm_hf and --include_path {TASKS_PATH}
(shipped offline tasks: {", ".join(TASK_NAMES)}; tag {TAG}). Every other option goes to lm-eval unchanged
(--limit, --num_fewshot, --output_path, --log_samples, --confirm_run_unsafe_code, --apply_chat_template, ...).
Without pretrained=, the default model is used (dfm-hf: the bundled model); without --batch_size, 32 rows per
forward pass (lm-eval's own default is 1); without --device, CUDA when available, else the CPU. DFMLM model
arguments: mc_num, batch_size, num_inference_steps, gen_length, block_length, guidance_scale, scheduler_preset,
temperature, device, dtype, seed, estimator, max_length, revision.
"""


def _has_option(argv: Sequence[str], *names: str) -> bool:
    return any(a in names or any(a.startswith(n + "=") for n in names) for a in argv)


def cli_main(argv: Optional[Sequence[str]] = None, default_model: Optional[Callable[[], str]] = None) -> int:
    """``dfm-hf lm-eval``: lm-eval's own command line with ``--model dfm_hf`` and the shipped tasks.

    Args:
        argv: lm-eval's options (default: ``sys.argv[1:]``).
        default_model: called for the pipeline when ``--model_args`` names no ``pretrained``; None makes
            ``pretrained`` required.

    Raises:
        ValueError: (the dfm-hf CLI turns it into exit code 2) for ``--model`` (set here), ``--include_path`` (set
            here: pass your own task YAML files as ``--tasks`` paths instead), or no ``pretrained`` and no
            ``default_model``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if _has_option(argv, "-h", "--help"):
        print(_USAGE, file=sys.stderr)
        argv = ["--help"]
    if _has_option(argv, "--model", "-M"):
        raise ValueError(
            "`--model` is set by dfm-hf lm-eval (dfm_hf); pass the pipeline as --model_args pretrained=..."
        )
    if _has_option(argv, "--include_path"):
        raise ValueError(
            f"`--include_path` is set by dfm-hf lm-eval to the shipped tasks ({TASKS_PATH}); pass your own task "
            "YAML files as --tasks paths (lm-eval accepts them) or run lm-eval itself after importing "
            f"{harness.__name__}."
        )
    if argv != ["--help"]:
        # repeated --model_args merge in lm-eval's parser: ours first, the caller's win
        if not any("pretrained" in a for a in argv):
            if default_model is None:
                raise ValueError("`--model_args pretrained=PATH_OR_HUB_ID` is required (a DFM pipeline folder or id)")
            argv = ["--model_args", f"pretrained={default_model()}"] + argv
        if not _has_option(argv, "--batch_size", "-b"):
            argv = ["--batch_size", "32"] + argv
        if not _has_option(argv, "--device"):  # lm-eval's default is "cuda" even where there is none
            argv = ["--device", "cuda" if torch.cuda.is_available() else "cpu"] + argv
    from lm_eval._cli import HarnessCLI

    saved = sys.argv
    sys.argv = ["lm-eval", "run", "--model", "dfm_hf", "--include_path", TASKS_PATH, *argv]
    try:
        parser = HarnessCLI()
        parser.execute(parser.parse_args())
    finally:
        sys.argv = saved
    return 0
