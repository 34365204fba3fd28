"""Scores of one cell of a ``dfm-hf evaluate`` sweep, from its generated texts, with the packaged metrics."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

from .judge import text_entropies
from .results import QUALITY_METRICS
from .tasks import EvalExample, truncate_completion

__all__ = ["score_cell"]


@functools.cache
def _metric(name: str) -> Any:
    """The packaged ``evaluate`` metric ``name``, loaded once per process."""
    from . import metrics

    return metrics.load(name)


def _mean(values: list[Optional[float]]) -> float:
    """Mean of the values that are not None (NaN when none is)."""
    import numpy as np

    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else float("nan")


def score_cell(
    task: str,
    examples: list[EvalExample],
    texts: list[list[str]],
    *,
    pass_k: Sequence[int],
    num_samples: int,
    timeout: float,
    judge: Optional[tuple[Any, Any]],
    tokenizer: Any,
) -> dict[str, Any]:
    """Metrics of one cell from the generated spans (``texts[i][s]``: example i, sample s).

    HumanEval completions: ``pass@k`` for each ``k`` of ``pass_k`` up to ``num_samples`` (programs cut at the stop
    sequences, run in the sandbox with ``timeout`` seconds each). Infilling: ``exact_match`` (whitespace-normalised)
    and, for HumanEval, ``pass_rate`` of the filled programs. ``genppl``: the ``judge``'s generative perplexity and
    its tokenizer's entropy, or without a judge NaN and the entropy under ``tokenizer``. ``quality`` is the task's
    main metric (:data:`~dfm_hf.evaluation.results.QUALITY_METRICS`).
    """
    out: dict[str, Any] = {}
    if task in ("humaneval", "humaneval_oracle"):
        candidates = [[ex.prefix + truncate_completion(t) for t in ts] for ex, ts in zip(examples, texts)]
        ks = [k for k in pass_k if k <= num_samples]
        scores, _ = _metric("pass_at_k").compute(
            predictions=candidates, references=[ex.test for ex in examples], k=ks, timeout=timeout
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
                timeout=timeout,
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
            out.update(gen_ppl=float("nan"), entropy=_mean(text_entropies(tokenizer, samples)))
    metric = QUALITY_METRICS[task]
    out["quality"], out["quality_metric"] = out.get(metric, float("nan")), metric
    return out
