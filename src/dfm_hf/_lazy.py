"""Lazy package attributes (PEP 562): a package names its public objects and the submodule defining each, and the
submodule is imported on first access. ``import dfm_hf`` therefore costs nothing, and libraries that look classes up
by name on the package (diffusers' ``from_pretrained`` reads ``getattr(dfm_hf, class_name)``) still find them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` resolving ``exports`` (``{name: module path}``) on first access.

    A module path is absolute (``"diffusers"``) or relative to ``package`` (``".pipelines"``). The value found is
    cached in ``namespace`` (the package's ``globals()``), so each name is looked up once. A submodule of the package
    itself (``dfm_hf.paths``) needs no entry: Python's import system sets it as an attribute when it is imported.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name], package)
        value = module if exports[name].rpartition(".")[2] == name else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
