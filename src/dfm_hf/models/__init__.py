"""The DFM denoiser: configuration, backbone and masked-generation head, the DFM losses and the block key/value cache.

Names resolve lazily (see :mod:`dfm_hf._lazy`): ``import dfm_hf.models.configuration_dfm`` (the conversion layer's
import) does not import the modeling module. Importing :mod:`.modeling_dfm` registers ``model_type="dfm"`` with the
transformers Auto classes (:func:`~.modeling_dfm.register_auto_classes`).
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_EXPORTS = {
    "DFM_PRESETS": ".configuration_dfm",
    "DFMConfig": ".configuration_dfm",
    "DFMBlockCache": ".cache",
    "IGNORE_INDEX": ".losses",
    "generalized_kl_loss": ".losses",
    "masked_cross_entropy_loss": ".losses",
    "DFMForMaskedGeneration": ".modeling_dfm",
    "DFMMaskedGenerationOutput": ".modeling_outputs",
    "DFMModel": ".modeling_dfm",
    "DFMModelOutput": ".modeling_outputs",
    "DFMPreTrainedModel": ".modeling_dfm",
    "register_auto_classes": ".modeling_dfm",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
