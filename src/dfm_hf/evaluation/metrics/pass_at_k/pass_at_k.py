"""pass@k of generated code, executed in dfm_hf's sandbox; a drop-in replacement for the Hub's ``code_eval``."""

from collections import defaultdict

import datasets
import evaluate
import numpy as np

from dfm_hf.evaluation.sandbox import run_programs

_CITATION = """\
@misc{chen2021codex,
      title={Evaluating Large Language Models Trained on Code},
      author={Mark Chen and Jerry Tworek and Heewoo Jun and Qiming Yuan and others},
      year={2021},
      eprint={2107.03374},
      archivePrefix={arXiv},
      primaryClass={cs.LG}
}
"""

_DESCRIPTION = """\
Functional correctness of generated programs, measured with the unbiased pass@k estimator of Chen et al. (2021).
Each candidate is run as `candidate + "\\n" + test_code` in its own sandboxed process (see `dfm_hf.evaluation.sandbox`:
resource limits, a wall-clock timeout, no network, no subprocesses, no writes outside a fresh temporary
directory). It takes the same inputs and returns the same outputs as the Hub's `code_eval`, without the
`HF_ALLOW_CODE_EVAL` switch. The sandbox is not a container: see the `dfm_hf.evaluation.sandbox` docstring for what
it does not stop.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of problems, each a list of candidate programs (strings) for that problem.
    references: list of test programs, one per problem. The program run is candidate + "\\n" + test; calling
        `check(entry_point)` (HumanEval style) is the caller's job, as with code_eval.
    k: the k of pass@k, an int or a list of ints >= 1 (default [1, 10, 100]). A k larger than the number of
        candidates of some problem is left out of the output, as code_eval does.
    num_workers: how many programs run at the same time (default 4).
    timeout: wall-clock seconds allowed to each program (default 3.0).
    memory_mb: address-space limit of each program in MiB (default 512).
Returns:
    A tuple (pass_at_k, results): pass_at_k maps "pass@k" to the estimate averaged over problems; results maps
    each problem's index (task_id) to a list of (completion_id, {"task_id", "passed", "result", "completion_id"})
    in completion order, "result" being "passed", "timed out" or "failed: <reason>".
Examples:
    >>> pass_at_k = dfm_hf.evaluation.metrics.load("pass_at_k")
    >>> scores, _ = pass_at_k.compute(references=["assert add(2, 3) == 5"],
    ...                               predictions=[["def add(a, b): return a * b", "def add(a, b): return a + b"]],
    ...                               k=[1, 2])
    >>> scores
    {'pass@1': 0.5, 'pass@2': 1.0}
"""


def estimate_pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Unbiased pass@k estimate of each problem (Chen et al., 2021).

    With ``n`` samples of which ``c`` are correct: ``pass@k = 1 - C(n - c, k) / C(n, k)``, computed without big
    binomials as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, and exactly 1.0 when ``n - c < k``.

    Args:
        num_samples: ``n`` per problem (an int, or a sequence/array with one entry per problem).
        num_correct: ``c`` per problem, same shape as ``num_samples``.
        k: the k of pass@k, ``1 <= k <= n`` for every problem.

    Returns:
        A float64 array with one estimate per problem.

    Raises:
        ValueError: ``k < 1``, ``k > n``, ``c < 0``, ``c > n`` or shapes that do not match (argument named).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    n_arr = np.atleast_1d(np.asarray(num_samples))
    c_arr = np.atleast_1d(np.asarray(num_correct))
    if n_arr.shape != c_arr.shape:
        raise ValueError(f"num_samples and num_correct must have the same shape, got {n_arr.shape} and {c_arr.shape}")
    if n_arr.size and (n_arr < k).any():
        raise ValueError(f"k={k} is larger than num_samples for some problem (min num_samples = {n_arr.min()})")
    if (c_arr < 0).any() or (c_arr > n_arr).any():
        raise ValueError("num_correct must satisfy 0 <= num_correct <= num_samples for every problem")
    out = np.empty(n_arr.shape, dtype=np.float64)
    for i, (n, c) in enumerate(zip(n_arr.tolist(), c_arr.tolist())):
        if n - c < k:
            out[i] = 1.0
        else:
            out[i] = 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))
    return out


def _check_ks(k) -> list:
    ks = [k] if isinstance(k, (int, np.integer)) and not isinstance(k, bool) else k
    try:
        ks = list(ks)
    except TypeError:
        raise ValueError(f"k must be an int or a list of ints >= 1, got {k!r}") from None
    if not ks:
        raise ValueError("k must not be empty")
    for value in ks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"k must hold ints >= 1, got {value!r} in k={k!r}")
    return [int(value) for value in ks]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PassAtK(evaluate.Metric):
    """pass@k with sandboxed execution; same inputs and outputs as the Hub's ``code_eval``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Value("string"),
                }
            ),
            homepage="https://github.com/openai/human-eval",
            codebase_urls=["https://github.com/openai/human-eval"],
            reference_urls=["https://arxiv.org/abs/2107.03374"],
        )

    def _compute(self, predictions, references, k=(1, 10, 100), num_workers=4, timeout=3.0, memory_mb=512):
        """Run every candidate against its problem's test and return ``(pass_at_k, results)``."""
        ks = _check_ks(k)
        if len(predictions) == 0:
            raise ValueError("predictions must hold at least one problem, got an empty list")
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references must have the same length, got {len(predictions)} and {len(references)}"
            )
        for i, candidates in enumerate(predictions):
            if len(candidates) == 0:
                raise ValueError(f"predictions[{i}] holds no candidate; every problem needs at least one")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")

        programs, ids = [], []
        for task_id, (candidates, test_case) in enumerate(zip(predictions, references)):
            for completion_id, candidate in enumerate(candidates):
                programs.append(candidate + "\n" + test_case)
                ids.append((task_id, completion_id))
        outcomes = run_programs(programs, n_workers=num_workers, timeout=timeout, memory_mb=memory_mb, as_main=False)

        results = defaultdict(list)
        for (task_id, completion_id), outcome in zip(ids, outcomes):
            record = {
                "task_id": task_id,
                "passed": outcome.passed,
                "result": outcome.message,
                "completion_id": completion_id,
            }
            results[task_id].append((completion_id, record))

        total = np.array([len(results[t]) for t in range(len(predictions))])
        correct = np.array([sum(r["passed"] for _, r in results[t]) for t in range(len(predictions))])
        scores = {
            f"pass@{value}": float(estimate_pass_at_k(total, correct, value).mean())
            for value in ks
            if (total >= value).all()
        }
        return scores, results
