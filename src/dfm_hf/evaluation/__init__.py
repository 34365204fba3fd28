"""Evaluation of DFM pipelines: task builders (:mod:`.tasks`) and the ``dfm-hf evaluate`` sweep (:mod:`.cli`)."""

from .tasks import (
    TASKS,
    EvalExample,
    build_genppl,
    build_humaneval,
    build_humaneval_infill,
    build_stdlib_infill,
    build_task,
    decode_generated,
    humaneval_program,
    load_humaneval,
    truncate_completion,
)
