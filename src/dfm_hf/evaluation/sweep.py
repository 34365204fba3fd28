"""The ``dfm-hf evaluate`` sweep: every cell (task, scheduler preset, NFE) not yet in results.csv is generated,
scored and written.

A cell's examples are cut into fixed chunks dealt round-robin to the processes (``accelerate``: one or several,
e.g. under ``torchrun``), and every output row draws from its own generator seeded by (seed, task, example,
sample): the numbers do not depend on the number of processes. The main process gathers the generated spans,
scores them and rewrites the result files after every cell, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

from ..devices import accelerator_available
from .generators import AR_PRESETS, ARGenerator, load_generator
from .judge import load_judge
from .results import read_results, write_all, write_samples, write_text
from .scoring import score_cell
from .tasks import EvalExample, build_task, decode_generated, row_seed

__all__ = ["DEFAULT_PRESETS", "run_sweep"]

#: Presets swept for a DFM pipeline when ``--presets`` is not given.
DEFAULT_PRESETS = ("linear-euler", "cubic-euler", "cubic-corrector")
#: Run settings that change the numbers: a resumed sweep must use the same ones.
_RUN_KEYS = (
    "model",
    "seed",
    "num_samples",
    "max_examples",
    "gen_length",
    "context_tokens",
    "infill_lines",
    "genppl_samples",
    "genppl_length",
    "judge",
)


def _chunks(examples: list[EvalExample], num_samples: int, batch_size: int) -> list[list[int]]:
    """Example indices of each model call: fixed, whatever the number of processes."""
    per_chunk = max(1, batch_size // num_samples)
    return [list(range(i, min(i + per_chunk, len(examples)))) for i in range(0, len(examples), per_chunk)]


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of ``args`` that change the numbers (run_config.json)."""
    return {k: getattr(args, k) for k in _RUN_KEYS}


def _check_run_config(path: str, config: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming each setting that differs from the run_config.json at ``path`` (if any)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    diff = sorted(k for k in _RUN_KEYS if saved.get(k) != config.get(k))
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in diff)
        raise ValueError(
            f"`--output_dir` holds results of other settings ({details}); use another --output_dir to keep both"
        )


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Run the missing cells of the sweep described by ``args`` (the flags of :func:`~dfm_hf.evaluation.cli.
    build_parser`, validated, ``args.model`` a path or Hub id); returns ``{"computed": [...], "skipped": [...],
    "num_processes": n}``.

    Raises:
        ValueError: ``--output_dir`` holds results of other settings, an unknown preset, ``--context_tokens``
            beyond the model's positions, a task without examples, or a model that does not load.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(cpu=not accelerator_available())  # accelerate picks CUDA, MPS, XPU... where present
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = args.device or accelerator.device
    csv_path = os.path.join(args.output_dir, "results.csv")
    config = _run_config(args)

    # main decides which cells are done; every process gets the same list
    state: list[Any] = [None]
    if main:
        os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
        _check_run_config(os.path.join(args.output_dir, "run_config.json"), config)
        state[0] = read_results(csv_path)
    if world > 1:
        broadcast_object_list(state)
    rows: list[dict[str, Any]] = state[0]
    done = {(r["task"], r["preset"], int(r["nfe"])) for r in rows}

    generator = load_generator(args.model, device)
    is_ar = isinstance(generator, ARGenerator)
    presets = args.presets or (list(AR_PRESETS[:1]) if is_ar else list(DEFAULT_PRESETS))
    unknown = [p for p in presets if p not in generator.presets]
    if unknown:
        raise ValueError(f"`--presets` {unknown} are not presets of this model; it has {generator.presets}")
    context = args.context_tokens or generator.max_positions
    if context > generator.max_positions:
        raise ValueError(f"`--context_tokens` {context} exceeds the model's {generator.max_positions} positions")
    options = dict(vars(args), context_tokens=context)

    cells = []
    for task in args.tasks:
        for preset in presets:
            for nfe in [0] if is_ar else sorted(set(args.nfe)):
                cells.append((task, preset, nfe))
    todo = [c for c in cells if c not in done]
    skipped = [c for c in cells if c in done]
    if main:
        write_text(os.path.join(args.output_dir, "run_config.json"), json.dumps(config, indent=2) + "\n")
        print(
            f"evaluate: {len(cells)} cell(s), {len(skipped)} already in results.csv, {len(todo)} to compute "
            f"({world} process(es))",
            file=sys.stderr,
        )
    judge = None
    task_cache: dict[str, list[EvalExample]] = {}
    bar = tqdm(total=len(todo), desc="evaluate", disable=not main, file=sys.stderr, dynamic_ncols=True)
    computed = []
    for task, preset, nfe in todo:
        bar.set_postfix_str(f"{task} {preset} nfe={nfe}")
        if task not in task_cache:
            task_cache[task] = build_task(task, generator.tokenizer, generator.mask_token_id, **options)
        examples = task_cache[task]
        if not examples:
            raise ValueError(f"task {task} has no example with these settings")
        n_samples = 1 if task == "genppl" else args.num_samples
        generator.set_preset(preset)
        started = time.time()
        local, gen_seconds, calls, n_calls = [], 0.0, 0.0, 0
        chunks = _chunks(examples, n_samples, args.batch_size)
        for ci, chunk in enumerate(chunks):
            if ci % world != rank:
                continue
            batch = [(i, s) for i in chunk for s in range(n_samples)]
            t0 = time.time()
            ids, used = generator.generate(
                [examples[i].input_ids for i, _ in batch],
                [row_seed(args.seed, task, i, s) for i, s in batch],
                nfe,
            )
            gen_seconds += time.time() - t0
            calls, n_calls = calls + used, n_calls + 1
            for (i, s), generated in zip(batch, ids):
                local.append((i, s, decode_generated(generator.tokenizer, generated, examples[i].kind)))
        stats = [(gen_seconds, calls, n_calls, len(local))]
        if world > 1:
            local, stats = gather_object(local), gather_object(stats)
        if main:
            texts: list[list[str]] = [[""] * n_samples for _ in examples]
            for i, s, text in local:
                texts[i][s] = text
            if task == "genppl" and judge is None and args.judge != "none":
                judge = load_judge(args.judge, device)
            scores = score_cell(
                task,
                examples,
                texts,
                pass_k=args.pass_k,
                num_samples=args.num_samples,
                timeout=args.timeout,
                judge=judge,
                tokenizer=generator.tokenizer,
            )
            total_rows = sum(st[3] for st in stats)
            row = {
                "task": task,
                "preset": preset,
                "nfe": nfe,
                **scores,
                "num_examples": len(examples),
                "num_samples": n_samples,
                "num_rows": total_rows,
                "num_truncated": sum(bool(ex.meta.get("truncated")) for ex in examples),
                "nfe_actual": sum(st[1] for st in stats) / max(1, sum(st[2] for st in stats)),
                "seconds_per_sample": sum(st[0] for st in stats) / max(1, total_rows),
                "wall_seconds": time.time() - started,
                "num_processes": world,
                "model": args.model,
                "judge": args.judge if task == "genppl" else "",
                "seed": args.seed,
                "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            rows = [r for r in rows if (r["task"], r["preset"], int(r["nfe"])) != (task, preset, nfe)] + [row]
            write_samples(args.output_dir, task, preset, nfe, examples, texts)
            write_all(args.output_dir, rows, plots=not args.no_plots)
        computed.append((task, preset, nfe))
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    summary = {"computed": computed, "skipped": skipped, "num_processes": world}
    if main:
        if not todo and rows:
            write_all(args.output_dir, rows, plots=not args.no_plots)
        record = {"finished_at": datetime.now(timezone.utc).isoformat(), **summary}
        with open(os.path.join(args.output_dir, "run_log.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"evaluate: computed {len(computed)} cell(s), skipped {len(skipped)}; {csv_path}", file=sys.stderr)
    return summary
