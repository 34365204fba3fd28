"""Evaluation metrics packaged as local ``evaluate`` modules.

Each metric lives in ``dfm_hf/evaluation/metrics/<name>/<name>.py`` and can be loaded with :func:`load` (or with
``evaluate.load(<that folder>)``), offline, without the Hugging Face Hub:

* ``pass_at_k``: the Hub's ``code_eval`` (same inputs and outputs), executing code with
  :mod:`dfm_hf.evaluation.sandbox`.
* ``infilling_exact_match``: exact match of filled spans, and the pass rate of their tests when given.
* ``generative_perplexity``: perplexity of generated texts under a judge causal LM, and their token entropy.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import evaluate

__all__ = ["list_metrics", "load", "metric_path"]

_METRICS_DIR = os.path.dirname(os.path.abspath(__file__))


def list_metrics() -> list[str]:
    """Names accepted by :func:`load`: the sub-folders holding a script named like the folder."""
    return sorted(
        entry
        for entry in os.listdir(_METRICS_DIR)
        if not entry.startswith(("_", ".")) and os.path.isfile(os.path.join(_METRICS_DIR, entry, entry + ".py"))
    )


def metric_path(name: str) -> str:
    """Folder of the packaged metric ``name`` (what ``evaluate.load`` takes).

    Raises:
        ValueError: ``name`` is not one of :func:`list_metrics`.
    """
    accepted = list_metrics()
    if not isinstance(name, str) or name not in accepted:
        raise ValueError(f"name must be one of {accepted}, got {name!r}")
    return os.path.join(_METRICS_DIR, name)


def load(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load the packaged metric ``name`` with ``evaluate.load`` (extra keyword arguments are passed on).

    Raises:
        ValueError: ``name`` is not one of :func:`list_metrics` (the message lists them).
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
