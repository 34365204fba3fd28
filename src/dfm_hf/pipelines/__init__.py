"""Pipelines: `DFMPipeline` (the call loop), its model runner, loading policy, LoRA helpers and released models."""

from .pipeline_dfm import DFMPipeline, DFMPipelineOutput

__all__ = ["DFMPipeline", "DFMPipelineOutput"]
