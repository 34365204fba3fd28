"""Reading a training run's log (``<output_dir>/logs/metrics.jsonl``), shared by the training tests."""

from __future__ import annotations

import json
import os


def read_log(out: str) -> list[dict]:
    """Every record of the run's ``logs/metrics.jsonl``, in order."""
    with open(os.path.join(out, "logs", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def losses(records: list[dict]) -> dict[int, float]:
    """step -> training loss (a step logged twice, before a kill and after resuming, keeps its last value)."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}
