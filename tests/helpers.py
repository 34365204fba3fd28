"""Small real components for tests: a BPE tokenizer trained on stdlib sources and tiny DFM pipelines."""

from __future__ import annotations

import functools
import glob
import os

import torch

from dfm_hf.data import train_bpe_tokenizer
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.schedulers import DiscreteFlowScheduler

STDLIB = os.path.dirname(os.__file__)


def stdlib_texts(pattern: str = "json/*.py") -> list[str]:
    """Real Python sources of the running interpreter."""
    return [open(f, encoding="utf-8").read() for f in sorted(glob.glob(os.path.join(STDLIB, pattern)))]


@functools.cache
def _tokenizer(vocab_size: int):
    return train_bpe_tokenizer(stdlib_texts(), vocab_size=vocab_size)


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE (pad 0, eos 1, mask 2) trained in about a second on ``json/*.py``; a fresh copy per call."""
    import copy

    return copy.deepcopy(_tokenizer(vocab_size))


def tiny_pipeline(seed: int = 0, time_conditioning: bool = False, **scheduler_kwargs) -> DFMPipeline:
    """A randomly initialised tiny DFM pipeline (hidden 64, 2 layers) with a real tokenizer."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = DFMConfig.from_preset("tiny", tokenizer=tok, time_conditioning=time_conditioning)
    model = DFMForMaskedGeneration(config).eval()
    scheduler = DiscreteFlowScheduler(mask_token_id=tok.mask_token_id, vocab_size=config.vocab_size, **scheduler_kwargs)
    pipe = DFMPipeline(model=model, scheduler=scheduler, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_lora_adapter(pipe: DFMPipeline, path, seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj")):
    """A PEFT LoRA adapter (r=4 on ``targets``, random non-zero lora_B) of ``pipe.model``, saved by peft in ``path``."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(pipe.model), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(path))
    return path
