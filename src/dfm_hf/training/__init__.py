"""Training: the DFM data collator (t, x_t, labels, couplings), DiffuLLaMA-style attention annealing masks, the
training losses, the block-diffusion objective (``block_diffusion``), and the scripts (``train.py``,
``lora_finetune.py``) with their parts: ``arguments`` (flags and checks), ``batches`` (rows and the reproducible batch
plan), ``checkpoints`` (save / resume), ``adapters`` (the base model to adapt, LoRA, the shippable adapter folder).

Names resolve lazily: a name's submodule is imported on its first use.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

#: public name -> submodule of ``dfm_hf.training`` defining it
_EXPORTS = {
    "COUPLINGS": ".collator",
    "TIME_SAMPLINGS": ".collator",
    "DFMDataCollator": ".collator",
    "annealed_attention_mask": ".collator",
    "annealing_visible_fraction": ".collator",
    "block_diffusion_inputs": ".block_diffusion",
    "block_diffusion_logits": ".block_diffusion",
    "LOSS_TYPES": ".losses",
    "LOSS_WEIGHTINGS": ".losses",
    "batch_loss": ".losses",
    "dfm_loss": ".losses",
    "inverse_t_cross_entropy_loss": ".losses",
    "kappa_rate": ".losses",
    "load_adapted_pipeline": ".adapters",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
