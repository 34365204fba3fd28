"""Quantizing a converted model while it is filled: transformers' quantizer hooks driven by the strict loader.

The quantizer transformers builds from a ``quantization_config`` (``TorchAoConfig``, ``BitsAndBytesConfig``) runs its
own steps in the order ``PreTrainedModel.from_pretrained`` runs them: it checks the environment and the device map,
prepares the empty model (bitsandbytes swaps ``nn.Linear`` for its 4/8-bit layers; both leave the output head and
tied weights in full precision), quantizes each weight as it is filled, and records itself on the model
(``model.hf_quantizer``, ``config.quantization_config``) so that ``save_pretrained`` writes a quantized checkpoint.
The caller fills the weights one tensor at a time, so only one full-precision weight exists at any moment beside the
quantized ones. Which configs are accepted is checked by the caller
(``dfm_hf.models.loading.check_quantization_config``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def prepare_quantizer(quantization_config: Any, device_map: Any) -> tuple[Any, Any]:
    """``(quantizer, device_map)``: transformers' on-the-fly quantizer for ``quantization_config`` with its
    environment checked, and ``device_map`` as it adjusts it (bitsandbytes places an unmapped model on the GPU)."""
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    quantizer.validate_environment(device_map=device_map, weights_only=True)
    return quantizer, quantizer.update_device_map(device_map)


def prepare_model(quantizer: Any, model: nn.Module, dtype: torch.dtype, device_map: Optional[dict[str, Any]]) -> None:
    """Let ``quantizer`` prepare the empty (meta-device) ``model`` before any weight is filled."""
    quantizer.preprocess_model(model=model, dtype=dtype, device_map=device_map, checkpoint_files=None)


def quantized_tensors(quantizer: Any, model: nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors to put into ``model`` for weight ``name`` read as ``tensor`` (already on its device): the weight
    itself when ``quantizer`` leaves it in full precision; otherwise what quantizing it gives (torchao quantizes the
    module in place and returns nothing more to set; bitsandbytes returns its 4/8-bit parameter)."""
    if not quantizer.param_needs_quantization(model, name):
        return {name: tensor}
    operation = quantizer.get_quantize_ops()
    return operation.convert({name: tensor}, model=model, full_layer_name=name, missing_keys=set(), config=model.config)


def pop_model_quantization(load_kwargs: dict[str, Any]) -> Any:
    """Take the ``quantization_config`` meant for the converted model out of a causal LM's ``load_kwargs`` and return
    it (None when there is none). A ``GgufConfig`` stays: it says how transformers reads a GGUF source."""
    from transformers import GgufConfig

    if isinstance(load_kwargs.get("quantization_config"), GgufConfig):
        return None
    return load_kwargs.pop("quantization_config", None)


def finish_quantization(quantizer: Any, model: nn.Module) -> None:
    """Record ``quantizer`` on the filled ``model`` (``model.hf_quantizer``, ``config.quantization_config``)."""
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


__all__ = ["finish_quantization", "pop_model_quantization", "prepare_model", "prepare_quantizer", "quantized_tensors"]
