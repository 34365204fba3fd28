"""The modules of dfm_hf import each other one way only: the graph of intra-package imports has no cycle.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` / ``from ... import``
statement counts, at module level or inside a function (a lazy import still ties the two modules together), relative
imports resolved against the module's package, and ``from package import name`` counted as an import of the
submodule ``package.name`` when that is a module. Python's implicit import of a module's parent packages is not an
edge (every module would otherwise depend on ``dfm_hf/__init__.py``), nor are dynamic ``importlib.import_module``
look-ups by name (e.g. diffusers' ``_get_compatibles`` pattern).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dfm_hf"
SKIPPED = ("bundled",)  # data folders shipped inside the package, not code


def module_files(root: Path = SRC / PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if any(part in SKIPPED for part in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``name`` (at ``path``) imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:  # `import dfm_hf.x.SomeClass`-like forms: keep the module part
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_dfm_hf_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "dfm_hf.hub" in graph and "dfm_hf.pipelines.lora" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among dfm_hf modules: " + " -> ".join(cycle)


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    assert "dfm_hf.evaluation.cli" in graph["dfm_hf.cli"]  # a lazy import inside main()
    assert "dfm_hf.hub.download" in graph["dfm_hf.pipelines.lora"]  # from ..hub.download import ...
    assert "dfm_hf.paths" in graph["dfm_hf.training.collator"]  # from .. import paths: the submodule
    assert "dfm_hf.sandbox" in graph["dfm_hf.metrics.pass_at_k.pass_at_k"]  # an absolute import


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}, "d": {"a"}}, ["b", "c", "b"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_find_cycle(graph: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle
