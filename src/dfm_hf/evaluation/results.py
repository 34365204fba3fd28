"""The files of a ``dfm-hf evaluate`` sweep: results.csv, results.md, the plots and the per-cell samples, each
written atomically (a temp file renamed over the target), so an interrupted sweep never leaves a torn file."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

from .tasks import EvalExample

__all__ = [
    "COLUMNS",
    "QUALITY_METRICS",
    "read_results",
    "results_markdown",
    "write_all",
    "write_plots",
    "write_results",
    "write_samples",
    "write_text",
]

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
#: The main metric of each task (the ``quality`` column).
QUALITY_METRICS = {
    "humaneval": "pass@1",
    "humaneval_oracle": "pass@1",
    "humaneval_infill": "pass_rate",
    "stdlib_infill": "exact_match",
    "genppl": "gen_ppl",
}


def _atomic_write(path: str, write: Callable[[str], Any], suffix: str = "") -> None:
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


def write_text(path: str, text: str) -> None:
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
        metric = QUALITY_METRICS.get(task, "quality")
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
        ("quality_vs_nfe.png", tasks, lambda t: QUALITY_METRICS.get(t, "quality")),
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


def write_samples(
    output_dir: str, task: str, preset: str, nfe: int, examples: list[EvalExample], texts: list[list[str]]
) -> None:
    """``samples/<task>__<preset>__nfe<nfe>.jsonl`` of one cell, atomically: per example its id, reference and
    generated texts."""
    path = os.path.join(output_dir, "samples", f"{task}__{preset}__nfe{nfe}.jsonl")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for ex, ts in zip(examples, texts):
                f.write(json.dumps({"id": ex.example_id, "reference": ex.reference, "samples": ts}) + "\n")

    _atomic_write(path, write, ".jsonl")


def write_all(output_dir: str, rows: list[dict[str, Any]], plots: bool = True) -> None:
    """results.csv, results.md and (when ``plots``) the plots of ``rows`` in ``output_dir``."""
    write_results(os.path.join(output_dir, "results.csv"), rows)
    write_text(os.path.join(output_dir, "results.md"), results_markdown(rows))
    if plots:
        write_plots(rows, output_dir)
