"""Exact match of infilled code spans, and the pass rate of the filled programs' tests (run in dfm_hf's sandbox)."""

import datasets
import evaluate

from dfm_hf.evaluation.sandbox import run_programs

_DESCRIPTION = """\
Infilling evaluation: the share of predicted spans equal to the reference spans (optionally after stripping
trailing whitespace on every line and trailing blank lines), and, when tests are given, the share of filled
programs `prefix + prediction + suffix + "\\n" + test` that run to their end in the `dfm_hf.evaluation.sandbox` sandbox.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted spans (strings).
    references: list of reference spans (strings), one per prediction.
    normalize_whitespace: compare after stripping trailing whitespace of every line and trailing blank lines
        (default False: exact string equality).
    references_tests: optional list of test programs, one per prediction; when given, "pass_rate" is returned.
    prefixes: optional list of the code before each span (default: empty), used to build the programs.
    suffixes: optional list of the code after each span (default: empty), used to build the programs.
    num_workers: how many programs run at the same time (default 4).
    timeout: wall-clock seconds allowed to each program (default 3.0).
Returns:
    {"exact_match": float in [0, 1]} plus {"pass_rate": float in [0, 1]} when references_tests is given.
Examples:
    >>> metric = dfm_hf.evaluation.metrics.load("infilling_exact_match")
    >>> metric.compute(predictions=["return a + b  \\n"], references=["return a + b\\n"], normalize_whitespace=True)
    {'exact_match': 1.0}
"""


def normalize_span(text: str) -> str:
    """Strip trailing whitespace of every line, then trailing blank lines."""
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip("\n")


def _optional_list(value, name: str, size: int) -> list:
    if value is None:
        return [""] * size
    if isinstance(value, str) or len(value) != size:
        got = "a str" if isinstance(value, str) else f"length {len(value)}"
        raise ValueError(f"{name} must be a list with one string per prediction ({size}), got {got}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(item).__name__}")
    return list(value)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class InfillingExactMatch(evaluate.Metric):
    """Exact match of infilled spans and, with tests, the pass rate of the completed programs."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        normalize_whitespace=False,
        references_tests=None,
        prefixes=None,
        suffixes=None,
        num_workers=4,
        timeout=3.0,
    ):
        """Return ``{"exact_match": ...}`` and, when ``references_tests`` is given, ``"pass_rate"``."""
        if len(predictions) == 0:
            raise ValueError("predictions must hold at least one span, got an empty list")
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references must have the same length, got {len(predictions)} and {len(references)}"
            )
        if normalize_whitespace:
            matches = [normalize_span(p) == normalize_span(r) for p, r in zip(predictions, references)]
        else:
            matches = [p == r for p, r in zip(predictions, references)]
        scores = {"exact_match": sum(matches) / len(matches)}
        if references_tests is None:
            if prefixes is not None or suffixes is not None:
                raise ValueError("prefixes and suffixes are only used with references_tests, which is missing")
            return scores
        tests = _optional_list(references_tests, "references_tests", len(predictions))
        before = _optional_list(prefixes, "prefixes", len(predictions))
        after = _optional_list(suffixes, "suffixes", len(predictions))
        programs = [b + p + a + "\n" + t for b, p, a, t in zip(before, predictions, after, tests)]
        outcomes = run_programs(programs, n_workers=num_workers, timeout=timeout, as_main=False)
        scores["pass_rate"] = sum(o.passed for o in outcomes) / len(outcomes)
        return scores
