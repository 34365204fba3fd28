"""Converting foreign checkpoints into :class:`~dfm_hf.DFMForMaskedGeneration`, natively (never remote code).

Two sources:

- **Released masked-diffusion LMs** (:func:`load_released_model`, what ``DFMForMaskedGeneration.from_pretrained``
  runs when ``config.json`` is not ours): LLaDA (:mod:`.llada`), Dream / DiffuCoder (:mod:`.dream`), and the
  block-diffusion families SDAR (:mod:`.sdar`), Fast-dLLM v2 (:mod:`.fast_dllm_v2`), LLaDA2.x (:mod:`.llada2`) and
  BD3-LM / MDLM (:mod:`.bd3lm`), read by the strict loader (:mod:`.loader`, :mod:`.checkpoint`). Config and weights
  are converted on load; ``save_pretrained`` then writes our own format.
- **Causal LMs** of the Llama, Mistral and Qwen2 families (:func:`causal_lm_to_dfm`, what
  ``DFMForMaskedGeneration.from_causal_lm`` runs; :mod:`.causal_lm`).

The model class arrives as an argument (``cls``): this package imports only the configuration of :mod:`dfm_hf.models`
and the download helper of :mod:`dfm_hf.hub`. Names resolve lazily, each from the submodule defining it.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

#: public name -> submodule defining it (imported on first access)
_EXPORTS = {
    "CAUSAL_LM_MODEL_TYPES": ".families",
    "RELEASED_MODEL_TYPES": ".families",
    "detect_family": ".families",
    "CheckpointIndex": ".checkpoint",
    "MODEL_ALLOW_PATTERNS": ".checkpoint",
    "read_checkpoint_index": ".checkpoint",
    "read_config_dict": ".checkpoint",
    "resolve_folder": ".checkpoint",
    "llada_config_to_dfm": ".llada",
    "llada_to_dfm_name": ".llada",
    "dream_config_to_dfm": ".dream",
    "sdar_config_to_dfm": ".sdar",
    "fast_dllm_v2_config_to_dfm": ".fast_dllm_v2",
    "llada2_config_to_dfm": ".llada2",
    "bd3lm_config_to_dfm": ".bd3lm",
    "expected_tensor_names": ".loader",
    "load_released_model": ".loader",
    "quantize_model": ".loader",
    "pop_model_quantization": ".quantization",
    "released_dfm_config": ".loader",
    "TOKENIZER_ALLOW_PATTERNS": ".causal_lm",
    "causal_lm_config_to_dfm": ".causal_lm",
    "causal_lm_folder": ".causal_lm",
    "causal_lm_to_dfm": ".causal_lm",
    "convert_causal_lm": ".causal_lm",
    "load_causal_lm": ".causal_lm",
    "load_causal_lm_tokenizer": ".causal_lm",
    "new_mask_token_id": ".causal_lm",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
