"""What fills the masked rows of the evaluation tasks: a DFM pipeline with a scheduler preset, or a causal LM left to
right (the autoregressive baseline, presets ``ar-sample`` / ``ar-greedy``)."""

from __future__ import annotations

import inspect
import os
from typing import Any, Union

__all__ = ["AR_PRESETS", "ARGenerator", "DFMGenerator", "load_generator"]

#: Presets of a causal LM: ancestral sampling at temperature 1, and greedy decoding.
AR_PRESETS = ("ar-sample", "ar-greedy")


class DFMGenerator:
    """Fills the masked positions of rows with a :class:`~dfm_hf.DFMPipeline` and a named scheduler preset."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.tokenizer = pipe.tokenizer
        self.mask_token_id = pipe.mask_token_id
        self.max_positions = pipe.model.config.max_position_embeddings
        self.presets = sorted(pipe.scheduler_presets)

    def set_preset(self, name: str) -> None:
        """Use the preset ``name`` for the next calls."""
        self.pipe.load_scheduler_preset(name)

    def generate(self, rows: list[list[int]], seeds: list[int], nfe: int) -> tuple[list[list[int]], float]:
        """Generated ids of each row (the masked positions, in order) and the number of model calls (each call
        runs the whole batch, so it is also the number of calls per row)."""
        import torch

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        out = self.pipe(
            input_ids=rows,
            gen_length=0,
            num_inference_steps=nfe,
            generator=generators,
            output_type="pt",
            return_full_text=False,
        )
        counts = [sum(1 for t in r if t == self.mask_token_id) for r in rows]
        return [out.sequences[i, :n].tolist() for i, n in enumerate(counts)], out.nfe


class ARGenerator:
    """Left-to-right generation with a causal LM: a masked span is generated from the text before it only."""

    def __init__(self, model: Any, tokenizer: Any, device: Any) -> None:
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, device
        mask = tokenizer.mask_token_id
        self.mask_token_id = int(mask) if mask is not None else len(tokenizer)
        self.max_positions = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
        self.presets = list(AR_PRESETS)
        self.greedy = False
        # the cache's argument and output field: `cache` or `past_key_values`, by transformers version
        params = inspect.signature(model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"

    def set_preset(self, name: str) -> None:
        """``ar-sample`` (ancestral sampling at temperature 1, float64 draws) or ``ar-greedy``."""
        if name not in AR_PRESETS:
            raise ValueError(f"a causal LM takes the presets {list(AR_PRESETS)}, got {name!r}")
        self.greedy = name == "ar-greedy"

    def generate(self, rows: list[list[int]], seeds: list[int], nfe: int) -> tuple[list[list[int]], float]:
        """Per row: the tokens before its first mask are the prompt (EOS when empty); one call per token.

        Returns the generated ids and the mean number of model calls per row (``nfe`` is not used)."""
        import torch

        outputs, calls = [], 0
        for row, seed in zip(rows, seeds):
            first = row.index(self.mask_token_id)
            n_new = sum(1 for t in row if t == self.mask_token_id)
            prompt = row[:first] or [self.tokenizer.eos_token_id]
            prompt = prompt[-(self.max_positions - n_new) :]
            generator = torch.Generator().manual_seed(seed)
            ids = torch.tensor([prompt], device=self.device)
            past, new = None, []
            with torch.no_grad():
                for _ in range(n_new):
                    out = self.model(input_ids=ids, use_cache=True, **{self._cache_key: past})
                    past, calls = getattr(out, self._cache_key), calls + 1
                    logits = out.logits[0, -1].double()
                    if self.greedy:
                        token = int(logits.argmax())
                    else:
                        token = int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator))
                    new.append(token)
                    ids = torch.tensor([[token]], device=self.device)
            outputs.append(new)
        return outputs, calls / max(1, len(rows))


def load_generator(model: str, device: Any) -> Union[DFMGenerator, ARGenerator]:
    """A :class:`DFMGenerator` for a DFM pipeline (folder with model_index.json, or Hub id), else an
    :class:`ARGenerator` for a causal LM folder."""
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"`--model` {model!r} is neither a DFM pipeline folder nor a causal LM folder")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return ARGenerator(AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model), device)
    from ..pipelines import DFMPipeline

    try:
        pipe = DFMPipeline.from_pretrained(model)
    except Exception as e:  # a missing folder, an unknown Hub id, a broken checkpoint
        raise ValueError(f"`--model` {model!r} could not be loaded as a DFM pipeline: {type(e).__name__}: {e}") from e
    if pipe.tokenizer is None:
        raise ValueError(f"`--model` {model!r} has no tokenizer; the evaluation tasks need one")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return DFMGenerator(pipe)
