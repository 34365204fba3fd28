"""Generation: the sampling loops shared by `DFMPipeline` and ``DFMForMaskedGeneration.generate`` (full attention,
block diffusion, the model runners and caches), `DFMGenerationConfig` (``generation_config.json``), the model's
``generate()`` mixin and the streamers of intermediate drafts (names resolve lazily)."""

from __future__ import annotations

from .._lazy import lazy_attributes

_EXPORTS = {
    "DFMGenerateOutput": ".utils",
    "DFMGenerationConfig": ".configuration",
    "DFMGenerationMixin": ".utils",
    "DraftFeed": ".streamers",
    "TerminalStreamer": ".streamers",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
