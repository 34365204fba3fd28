"""The modules of dfm_hf import each other one way only, and importing the package is lazy.

The graph is read from the source with ``ast`` (nothing is imported). An edge ``a -> b`` is any of:

- an ``import`` / ``from ... import`` statement, at module level or inside a function (a lazy import still ties
  the two modules together), relative imports resolved against the module's package, and ``from package import
  name`` counted as an import of the submodule ``package.name`` when that is a module;
- a look-up by name, ``importlib.import_module("dfm_hf.x")`` with a literal string;
- Python's implicit import of the parent packages: importing ``dfm_hf.a.b`` runs ``dfm_hf/__init__.py`` and
  ``dfm_hf/a/__init__.py`` first, so ``a -> b`` also adds ``a -> dfm_hf.a`` and ``a -> dfm_hf``, and every module
  depends on its own parent packages. That is why every package ``__init__`` resolves its names lazily: what an
  ``__init__`` imports, every importer of any of its submodules imports too.

Every edge must point down the layers of ``LAYERS`` (docs/architecture.md), and the graph has no cycle.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dfm_hf"
SKIPPED = ("bundled",)  # data folders shipped inside the package, not code

#: Layers, lowest first: a module may import only modules of its own layer or a lower one. A name matches a module
#: and its submodules; the longest match wins.
LAYERS: list[tuple[str, ...]] = [
    ("dfm_hf", "dfm_hf._lazy", "dfm_hf.devices", "dfm_hf.rng", "dfm_hf.paths", "dfm_hf.data"),
    ("dfm_hf.schedulers",),
    ("dfm_hf.hub",),
    ("dfm_hf.models", "dfm_hf.models.configuration_dfm", "dfm_hf.models.rope_parameters"),
    ("dfm_hf.conversion",),
    ("dfm_hf.models.*",),  # the modeling modules: they look the conversion up when loading a foreign checkpoint
    ("dfm_hf.generation",),  # generate(), its config and streamers: the model's mixin, run on the low-level modules
    ("dfm_hf.models.modeling_dfm",),
    ("dfm_hf.pipelines",),
    ("dfm_hf.training",),
    ("dfm_hf.evaluation",),
    ("dfm_hf.bundles",),
    ("dfm_hf.cli",),
]

#: Pairs the layer order would allow but the design forbids: (importer prefix, imported prefix, allowed exceptions).
FORBIDDEN = [
    # the model and conversion layers reach the Hub only through the leaf download helper
    ("dfm_hf.models", "dfm_hf.hub", ("dfm_hf.hub", "dfm_hf.hub.download")),
    ("dfm_hf.conversion", "dfm_hf.hub", ("dfm_hf.hub", "dfm_hf.hub.download")),
    # evaluation measures pipelines; it does not train
    ("dfm_hf.evaluation", "dfm_hf.training", ()),
]


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


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``name`` (at ``path``) imports, anywhere in its source (see the module doc)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:  # `import dfm_hf.x.SomeClass`-like forms: keep the module part
            target = target.rpartition(".")[0]
        for module in [*_parents(target), target]:
            if module and module != name:
                found.add(module)

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
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = node.args[0].value
            if called == "import_module" and isinstance(target, str) and target.startswith(PACKAGE):
                add(target)
    found.update(p for p in _parents(name) if p != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(name: str) -> int:
    """Index in ``LAYERS`` of the longest prefix matching ``name`` (``"x.*"`` matches submodules of ``x`` only)."""
    best, best_len = None, -1
    for index, names in enumerate(LAYERS):
        for prefix in names:
            if prefix.endswith(".*"):
                hit = name.startswith(prefix[:-1])
                size = len(prefix) - 1
            else:
                hit = name == prefix or name.startswith(prefix + ".")
                size = len(prefix)
            if hit and size > best_len:
                best, best_len = index, size
    assert best is not None, f"{name} is in no layer of LAYERS: add it"
    return best


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


def without_own_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` less each module's edges to its own parent packages. Python runs those first, whatever the package
    ``__init__`` imports of its own submodules, so they close no cycle; edges to another module's parents stay."""
    return {name: {t for t in targets if t not in _parents(name)} for name, targets in graph.items()}


def test_dfm_hf_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "dfm_hf.hub" in graph and "dfm_hf.pipelines.lora" in graph
    cycle = find_cycle(without_own_parents(graph))
    assert cycle is None, "import cycle among dfm_hf modules: " + " -> ".join(cycle)


def test_imports_point_down_the_layers() -> None:
    graph = import_graph()
    upward = [
        f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)
    forbidden = [
        f"{a} -> {b}"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        for importer, imported, allowed in FORBIDDEN
        if (a == importer or a.startswith(importer + "."))
        and (b == imported or b.startswith(imported + "."))
        and b not in allowed
    ]
    assert not forbidden, "forbidden imports:\n" + "\n".join(forbidden)


def test_the_graph_sees_lazy_relative_implicit_and_importlib_imports() -> None:
    graph = import_graph()
    assert "dfm_hf.hub.download" in graph["dfm_hf.pipelines.lora"]  # from ..hub.download import ...
    assert "dfm_hf.hub" in graph["dfm_hf.pipelines.lora"]  # ... which runs dfm_hf/hub/__init__.py first
    assert "dfm_hf.paths" in graph["dfm_hf.training.collator"]  # from .. import paths: the submodule
    assert {"dfm_hf", "dfm_hf.training"} <= graph["dfm_hf.training.collator"]  # its own parent packages
    assert "dfm_hf.conversion" in graph["dfm_hf.models.modeling_dfm"]  # importlib.import_module("dfm_hf.conversion")


def test_the_graph_reader_on_a_synthetic_package(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from ..b import y\n")
    (pkg / "b.py").write_text("import importlib\nM = importlib.import_module('dfm_hf.a.x')\n")
    modules = module_files(pkg)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["dfm_hf.a.x"] == {"dfm_hf", "dfm_hf.a", "dfm_hf.b"}
    assert graph["dfm_hf.b"] == {"dfm_hf", "dfm_hf.a", "dfm_hf.a.x"}
    assert find_cycle(without_own_parents(graph)) == ["dfm_hf.a.x", "dfm_hf.b", "dfm_hf.a.x"]


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


HEAVY = ("diffusers", "datasets", "accelerate", "peft", "evaluate", "dfm_hf.training", "dfm_hf.pipelines")


@pytest.mark.parametrize("statement", ["import dfm_hf", "import dfm_hf.paths", "import dfm_hf.schedulers.utils"])
def test_importing_the_package_or_a_leaf_is_lazy(statement: str) -> None:
    code = f"import sys\n{statement}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{statement!r} imported {out.stdout.strip()}"


def _packages() -> list[str]:
    return sorted(name for name, path in module_files().items() if path.name == "__init__.py")


@pytest.mark.parametrize("package", _packages())
def test_every_public_name_of_every_package_resolves(package: str) -> None:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", [])
    missing = [name for name in names if getattr(module, name, None) is None]
    assert not missing, f"{package}.__all__ names what it cannot resolve: {missing}"


def test_diffusers_finds_our_classes_and_their_base_classes_by_name() -> None:
    library = importlib.import_module(PACKAGE)
    from diffusers import SchedulerMixin
    from transformers import PreTrainedModel

    assert library.SchedulerMixin is SchedulerMixin and library.PreTrainedModel is PreTrainedModel
    assert issubclass(library.DiscreteFlowScheduler, SchedulerMixin)
    assert issubclass(library.DFMForMaskedGeneration, PreTrainedModel)
    assert getattr(library, "ModelMixin", None) is None  # names it does not define stay undefined
