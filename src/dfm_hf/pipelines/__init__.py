"""Pipelines: `DFMPipeline` and its scheduler presets and LoRA helpers."""

from .pipeline_dfm import DFMPipeline, DFMPipelineOutput
from .presets import PRESET_SPECS, default_scheduler_presets

__all__ = ["DFMPipeline", "DFMPipelineOutput", "PRESET_SPECS", "default_scheduler_presets"]
