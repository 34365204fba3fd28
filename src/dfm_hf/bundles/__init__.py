"""The shipped default model: an adapted model shipped as a small bundle (a LoRA adapter plus trained embedding rows,
our config, scheduler, presets and card) applied at load time onto a pretrained causal LM that the user installs
separately, and the small model that ships whole.

- :mod:`~dfm_hf.bundles.format`: the bundle's files, its checked ``bundle.json``, fingerprint and cache root;
- :mod:`~dfm_hf.bundles.build`: writing a bundle (``python -m dfm_hf.bundles.build``);
- :mod:`~dfm_hf.bundles.materialize`: the base sources, and the merged pipeline built once under the cache;
- :mod:`~dfm_hf.bundles.shipped`: which model is the default (:func:`bundled_model_path`).

This layer may import training, pipelines and evaluation; none of them imports it. Names resolve lazily.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

#: public name -> submodule of ``dfm_hf.bundles`` defining it
_EXPORTS = {
    "BUNDLE_FILE": ".format",
    "CACHE_ENV": ".format",
    "MAX_BUNDLE_BYTES": ".format",
    "MAX_LORA_RANK": ".format",
    "bundle_fingerprint": ".format",
    "cache_root": ".format",
    "read_bundle": ".format",
    "save_adapted_bundle": ".build",
    "save_bundle_from_finetuned": ".build",
    "BaseModelSource": ".materialize",
    "base_from_folder": ".materialize",
    "build_pipeline_from_bundle": ".materialize",
    "materialize_bundle": ".materialize",
    "materialized_path": ".materialize",
    "smollm2_base": ".materialize",
    "bundled_model_path": ".shipped",
    "require_bundled_model": ".shipped",
    "resolve_bundled_model": ".shipped",
    "small_model_path": ".shipped",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
