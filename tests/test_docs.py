"""The documentation cannot rot: its code runs, the commands it names exist, its links resolve.

- Every ```python snippet of README.md and docs/*.md runs, in this process, with the working directory in a temp
  folder (so whatever a snippet writes lands there). The path of the small shipped model,
  ``src/dfm_hf/bundled/dfm-code-stdlib``, is replaced by its absolute path, and Hub ids ``org/NAME`` by fresh repos of
  the loopback Hub that conftest starts. A snippet that cannot run offline carries a reason in an HTML comment right
  before its fence, ``<!-- not-run: REASON -->``; a long one carries ``<!-- test: slow -->``.
- Every command of a ```bash snippet names something that exists: a ``dfm-hf`` subcommand, an example or benchmark
  script, a ``python -m`` module, a file of the repository; and every ``--flag`` given to our own commands is one
  their ``--help`` lists.
- Every relative link of these files points to an existing file, and every ``#anchor`` to a heading of it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SMALL_MODEL = "src/dfm_hf/bundled/dfm-code-stdlib"
MARK = re.compile(r"^<!--\s*(not-run|test)\s*:\s*(.*?)\s*-->$")
TEST_MARKS = ("slow",)
FENCE = re.compile(r"^```([\w-]*)\s*$")
HUB_ID = re.compile(r"([\"'])org/([A-Za-z0-9._-]+)\1")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"^(examples|benchmarks|src|docs|model_cards|tests)/")
OUR_MODULE = re.compile(r"^dfm_hf(\.|$)")


@dataclass
class Snippet:
    """A fenced code block of a Markdown file, with the HTML comments right before its fence."""

    path: Path
    line: int  # 1-based line of the first line of code
    lang: str
    code: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    """The fenced blocks of ``path`` (fences at the start of a line), in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Snippet] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        marks: dict[str, str] = {}
        j = i - 1
        while j >= 0 and (m := MARK.match(lines[j].strip())):
            marks[m.group(1)] = m.group(2)
            j -= 1
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{path.name}:{i + 1}: the fence is never closed"
        found.append(Snippet(path, i + 2, opening.group(1), "\n".join(lines[i + 1 : end]), marks))
        i = end + 1
    return found


ALL = [s for path in DOC_FILES for s in snippets(path)]
PYTHON = [s for s in ALL if s.lang == "python"]
BASH = [s for s in ALL if s.lang in ("bash", "sh", "shell")]


def _param(snippet: Snippet):
    marks = [pytest.mark.slow] if snippet.marks.get("test") == "slow" else []
    return pytest.param(snippet, id=snippet.name, marks=marks)


def test_the_docs_have_snippets_and_marks_are_well_formed():
    assert (ROOT / "README.md") in DOC_FILES and len(DOC_FILES) > 5
    assert len(PYTHON) >= 10 and len(BASH) >= 5
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, text in enumerate(lines, 1):
            if "not-run" in text or re.match(r"\s*<!--\s*test\b", text):
                m = MARK.match(text.strip())
                assert m, f"{path.name}:{number}: write `<!-- not-run: REASON -->` or `<!-- test: slow -->`"
                nxt = lines[number] if number < len(lines) else ""
                assert FENCE.match(nxt) or MARK.match(nxt.strip()), f"{path.name}:{number}: not right before a fence"
    for s in ALL:
        assert set(s.marks) <= {"not-run", "test"}
        if "not-run" in s.marks:  # a skipped snippet says why
            assert len(s.marks["not-run"]) >= 10, f"{s.name}: give the reason it cannot run offline"
        if "test" in s.marks:
            assert s.marks["test"] in TEST_MARKS, f"{s.name}: unknown test mark {s.marks['test']!r}"


def runnable(snippet: Snippet, repo_owner: str, repo_prefix: str) -> str:
    """The snippet's code as run: the small model by absolute path, Hub ids in a fresh namespace of the loopback Hub,
    padded so that a traceback names the Markdown line."""
    code = snippet.code.replace(f'"{SMALL_MODEL}"', repr(str(ROOT / SMALL_MODEL)))
    code = HUB_ID.sub(lambda m: repr(f"{repo_owner}/{repo_prefix}-{m.group(2)}"), code)
    return "\n" * (snippet.line - 1) + code


@pytest.mark.parametrize("snippet", [_param(s) for s in PYTHON])
def test_python_snippet_runs(snippet: Snippet, tmp_path, monkeypatch, hub_repo_id, one_thread):
    if "not-run" in snippet.marks:
        pytest.skip(f"not run offline: {snippet.marks['not-run']}")
    owner, prefix = hub_repo_id.split("/")
    code = runnable(snippet, owner, prefix)
    monkeypatch.chdir(tmp_path)  # every relative path a snippet writes lands in the temp folder
    exec(compile(code, str(snippet.path), "exec"), {"__name__": "__main__"})


def test_snippets_name_the_small_model_by_its_repository_path():
    """The substitution above is what keeps the snippets off the real Hub: a snippet that loads a model names the small
    shipped one by its repository path, a Hub id of the ``org/`` namespace, or is marked not-run."""
    assert (ROOT / SMALL_MODEL / "model_index.json").is_file()
    for s in PYTHON:
        if "not-run" in s.marks:
            continue
        for m in re.finditer(r"from_pretrained\(\s*([\"'])([^\"']+)\1", s.code):
            target = m.group(2)
            assert target == SMALL_MODEL or target.startswith(("org/", "runs/")), f"{s.name}: loads {target!r}"


# ------------------------------------------------------------------------------------------------------------ bash


def commands(code: str) -> list[list[str]]:
    """The simple commands of a bash snippet: continuation lines joined, comments dropped, split at && ; |."""
    text = code.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="&;|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if set(token) <= set("&;|"):
                found.append(current)
                current = []
            else:
                current.append(token)
        found.append(current)
    return [c for c in found if c]


COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:dfm-hf|python\S*|torchrun|accelerate|bash)\s")


def inline_commands(path: Path) -> list[list[str]]:
    """The commands written in inline code (`` `dfm-hf train --stdlib` ``) of a Markdown file."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text))
    return [c for span in spans if COMMAND_START.match(span) for c in commands(span)]


def all_commands() -> list[tuple[str, list[str]]]:
    """``(where, command)`` for the commands of the bash snippets and of the inline code."""
    fenced = [(s.name, c) for s in BASH for c in commands(s.code)]
    return fenced + [(p.name, c) for p in DOC_FILES for c in inline_commands(p)]


def program(command: list[str]) -> tuple[str, str, list[str]]:
    """``(kind, target, arguments)`` of a command: kind is ``dfm-hf``, ``script`` (a .py file of the repository),
    ``module`` (``python -m``), ``bash`` (a .sh file) or ``other``."""
    words = [w for w in command if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]  # VAR=value prefixes
    if words and words[0] == "dfm-hf":
        return "dfm-hf", words[1] if len(words) > 1 else "", words[2:]
    if words and words[0] == "bash":
        return "bash", words[1], words[2:]
    if words and words[0].startswith("python") and len(words) > 2 and words[1] == "-m":
        return "module", words[2], words[3:]
    scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
    if words and words[0] in ("python", "torchrun", "accelerate") and scripts:
        return "script", words[scripts[0]], words[scripts[0] + 1 :]
    return "other", words[0] if words else "", words[1:]


def _captured(run) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            run()
        except SystemExit as e:
            assert e.code in (0, None), f"--help exited with {e.code}: {out.getvalue()[-2000:]}"
    return out.getvalue()


@functools.cache
def help_text(kind: str, target: str) -> str:
    """The ``--help`` output of one of our commands, run in this process."""
    if kind == "dfm-hf":
        from dfm_hf.cli import main

        return _captured(lambda: main([target, "--help"]))
    argv, path = sys.argv, sys.path[:]
    try:
        sys.argv = [target, "--help"]
        if kind == "module":
            return _captured(lambda: runpy.run_module(target, run_name="__main__", alter_sys=True))
        sys.path.insert(0, str((ROOT / target).parent))  # benchmark scripts import their neighbours
        return _captured(lambda: runpy.run_path(str(ROOT / target), run_name="__main__"))
    finally:
        sys.argv, sys.path[:] = argv, path


def _ours(kind: str, target: str) -> bool:
    return kind in ("dfm-hf", "script") or (kind == "module" and bool(OUR_MODULE.match(target)))


def test_commands_name_what_exists():
    from dfm_hf.cli import main

    usage = _captured(lambda: main(["--help"]))
    subcommands = set(re.search(r"\{([^}]*)\}", usage).group(1).split(","))
    assert {"generate", "train", "evaluate", "lm-eval"} <= subcommands
    seen = set()
    for where, command in all_commands():
        kind, target, args = program(command)
        where = f"{where}: {' '.join(command)[:80]}"
        if kind == "dfm-hf":
            assert target in subcommands, where
        elif kind in ("script", "bash"):
            assert (ROOT / target).is_file(), where
        elif kind == "module":
            assert importlib.util.find_spec(target) is not None, where
        for word in [target, *args]:
            if REPO_PATH.match(word):
                assert (ROOT / word).exists(), f"{where}: {word} does not exist"
        seen.add(kind)
    assert {"dfm-hf", "script", "module", "bash"} <= seen


def _flag_uses() -> dict[tuple[str, str], set[str]]:
    uses: dict[tuple[str, str], set[str]] = {}
    for _, command in all_commands():
        kind, target, args = program(command)
        if _ours(kind, target) and target:
            flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
            uses.setdefault((kind, target), set()).update(flags)
    return uses


def _help_param(kind: str, target: str):
    slow = [pytest.mark.slow] if target == "lm-eval" else []  # imports lm-eval (~10 s)
    return pytest.param(kind, target, id=f"{kind}:{target}", marks=slow)


@pytest.mark.parametrize(("kind", "target"), [_help_param(*key) for key in sorted(_flag_uses())])
def test_command_flags_are_in_its_help(kind, target):
    flags = _flag_uses()[(kind, target)]
    text = help_text(kind, target)
    assert "--help" in text or "usage" in text.lower(), text[:500]
    missing = sorted(f for f in flags if f != "--help" and not re.search(re.escape(f) + r"(?![\w-])", text))
    assert not missing, f"{kind} {target}: flags the docs use but --help does not list: {missing}"


#: Flags of other programs that the prose names (accelerate, torchrun, pip, ruff).
THIRD_PARTY_FLAGS = {
    "--num_processes",
    "--multi_gpu",
    "--cpu",
    "--config_file",
    "--nproc_per_node",
    "--no-deps",
    "--check",
    "--standalone",
}


@pytest.mark.slow
def test_flags_named_in_the_prose_exist():
    """Every ``--flag`` in inline code of the docs is a flag of one of our commands (or of the few other programs
    named): a renamed flag cannot linger in a table."""
    helps = "\n".join(help_text(kind, target) for kind, target in sorted(_flag_uses()))
    unknown = []
    for path in DOC_FILES:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for code in re.findall(r"`([^`]+)`", text):
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", code):
                if flag not in THIRD_PARTY_FLAGS and not re.search(re.escape(flag) + r"(?![\w-])", helps):
                    unknown.append(f"{path.name}: `{code}` names {flag}")
    assert not unknown, "\n".join(unknown)


# ----------------------------------------------------------------------------------------------------------- links


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (fenced blocks skipped)."""
    found, inside = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line) or line.strip() == "```":
            inside = not inside
            continue
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m and not inside:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


@pytest.mark.parametrize(
    "path", DOC_FILES + [ROOT / "benchmarks" / "README.md"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_resolve(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: link to {target} (no such file)"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.name}: link to {target} (no such heading)"
