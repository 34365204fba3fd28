"""`DFMGenerationMixin`: ``generate()`` for :class:`~dfm_hf.DFMForMaskedGeneration`, in transformers' style.

``model.generate(input_ids, attention_mask=None, generation_config=None, streamer=None, **kwargs)`` reads its settings
from ``generation_config`` (default: ``model.generation_config``, loaded from ``generation_config.json``; keyword
arguments override single fields), builds the scheduler its ``sampler`` names and runs the sampling loop of
:class:`~dfm_hf.DFMPipeline` on the model: the same loop, so the same settings and generator give the same tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from transformers.utils import ModelOutput

from ..rng import check_generator
from .block_diffusion import generate_blocks
from .call import SamplingCall, eos_token_ids
from .configuration import DFMGenerationConfig
from .fim import fim_infill_plan, generate_fim_blocks
from .full_attention import generate_full_attention, pack_rows
from .kv_cache import resolve_kv_cache


@dataclass
class DFMGenerateOutput(ModelOutput):
    """Output of :meth:`DFMGenerationMixin.generate`.

    Args:
        sequences: ``(rows, length)`` LongTensor on the CPU: each row's prompt (its attended tokens) followed by the
            generated tokens, right-padded with the pad id (the ``sequences`` of :class:`~dfm_hf.DFMPipeline`).
        nfe: number of model forward passes run.
    """

    sequences: Optional[torch.LongTensor] = None
    nfe: Optional[int] = None


def check_prompt(
    ids: list[int],
    gen_length: int,
    mask_token_id: int,
    vocab_size: int,
    max_positions: int,
    length_name: str = "gen_length",
) -> None:
    """Raise ``ValueError`` unless the prompt ``ids`` lie in ``[0, vocab_size)``, fit ``max_positions`` with the
    ``gen_length`` positions to generate (the argument called ``length_name``), and leave something to generate."""
    if any(v < 0 or v >= vocab_size for v in ids):
        raise ValueError(f"`input_ids` must lie in [0, vocab_size={vocab_size}).")
    if len(ids) + gen_length > max_positions:
        raise ValueError(
            f"prompt ({len(ids)} tokens) + `{length_name}` ({gen_length}) = {len(ids) + gen_length} exceeds the "
            f"model's max_position_embeddings={max_positions}."
        )
    if gen_length == 0 and mask_token_id not in ids:
        raise ValueError(
            f"The prompt has nothing to generate: `{length_name}` is 0 and it holds no mask token to infill."
        )


def prompt_rows(input_ids: Any, attention_mask: Any = None) -> list[list[int]]:
    """The token ids of each row's prompt: the positions where ``attention_mask`` is 1 (left or right padding).

    ``input_ids``: a ``(rows, length)`` or ``(length,)`` integer tensor; ``attention_mask``: None or 0/1 of the same
    shape. ``ValueError`` naming the argument otherwise.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or input_ids.is_floating_point():
        raise ValueError("`input_ids` must be a (rows, length) integer tensor.")
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    if ids.shape[0] == 0:
        raise ValueError("`input_ids` must hold at least one row.")
    ids = ids.cpu()
    if attention_mask is None:
        return ids.tolist()
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` must be None or a tensor shaped like `input_ids` {tuple(input_ids.shape)}.")
    mask = attention_mask.reshape(ids.shape).cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (prompt).")
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


class DFMGenerationMixin:
    """``generate()`` and the loading of ``generation_config.json`` for a DFM model (listed before the
    ``PreTrainedModel`` base, so that its ``generation_config_class`` is the one transformers reads)."""

    generation_config_class = DFMGenerationConfig

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        generation_config: Optional[DFMGenerationConfig] = None,
        streamer: Optional[Any] = None,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        **kwargs: Any,
    ) -> DFMGenerateOutput:
        """Generate ``max_new_tokens`` tokens after each prompt (or infill its mask tokens).

        Args:
            input_ids: ``(rows, length)`` prompt ids; mask tokens inside a prompt are infilled (full-attention models;
                a block model with FIM tokens: one run per prompt, see :mod:`~dfm_hf.generation.fim`).
            attention_mask: 1 at prompt tokens, 0 at padding (left or right); None: no padding.
            generation_config: the settings (a :class:`~dfm_hf.DFMGenerationConfig`); default
                ``self.generation_config``.
            streamer: receives the prompt, one draft after each step that ran the model and the final tokens
                (transformers' ``TextDiffusionStreamer`` protocol; see :mod:`dfm_hf.generation.streamers`).
            generator: one ``torch.Generator`` or one per row (as in :class:`~dfm_hf.DFMPipeline`).
            kwargs: fields of the config for this call (``max_new_tokens=32``, ``sampler="confidence"``...);
                anything else raises ``TypeError``.

        Returns:
            :class:`DFMGenerateOutput` with ``sequences`` and ``nfe``.
        """
        config = self._generation_config_for_call(generation_config, kwargs)
        model_config = self.config
        prompts = prompt_rows(input_ids, attention_mask)
        scheduler = config.build_scheduler(model_config.mask_token_id, model_config.vocab_size)
        mask = model_config.mask_token_id
        mask = scheduler.config.get("mask_token_id") if mask is None else mask
        if mask is None:
            raise ValueError("generate() needs a mask token id: neither the model config nor the sampler has one.")
        for ids in prompts:
            check_prompt(
                ids, config.max_new_tokens, mask, model_config.vocab_size, model_config.max_position_embeddings,
                length_name="max_new_tokens",
            )  # fmt: skip
        check_generator(generator, len(prompts))
        block_size = getattr(model_config, "block_size", None)
        infill = fim_infill_plan(prompts, mask, model_config) if block_size is not None else None  # generation.fim
        pad = next(p for p in (config.pad_token_id, model_config.pad_token_id, mask) if p is not None)
        call = SamplingCall(
            model=self,
            mask_token_id=mask,
            pad_token_id=pad,
            device=self.device,
            eos_token_ids=eos_token_ids(None, config),
        )
        cache_mode = resolve_kv_cache("auto", None, scheduler, model_config)
        common = dict(
            scheduler=scheduler,
            prompts=prompts,
            gen_length=config.max_new_tokens,
            num_inference_steps=config.num_inference_steps,
            generator=generator,
            guidance_scale=config.guidance_scale,
            skip_idle_steps=True,
            use_logits_to_keep=True,
            callback=None,
            tensor_inputs=[],
            return_full_text=True,
            streamer=streamer,
        )
        if block_size is not None and infill is not None:  # one run of masks per prompt, through the FIM tokens
            result = generate_fim_blocks(call, infill, cached=cache_mode == "block", **common)
        elif block_size is not None:
            result = generate_blocks(call, cached=cache_mode == "block", **common)
        else:
            result = generate_full_attention(call, kv_cache=cache_mode, **common)
        return DFMGenerateOutput(sequences=pack_rows(result.sample, result.keep, pad), nfe=result.nfe)

    def _generation_config_for_call(
        self, generation_config: Optional[DFMGenerationConfig], kwargs: dict[str, Any]
    ) -> DFMGenerationConfig:
        """A copy of ``generation_config`` (or the model's) with ``kwargs`` applied; ``TypeError`` for other kwargs."""
        base = generation_config if generation_config is not None else getattr(self, "generation_config", None)
        if base is None:
            base = DFMGenerationConfig.from_model_config(self.config)
        if not isinstance(base, DFMGenerationConfig):
            raise TypeError(f"`generation_config` must be a DFMGenerationConfig, got {type(base).__name__}.")
        config = copy.deepcopy(base)
        unused = config.update(**kwargs)
        if unused:
            raise TypeError(
                f"generate() got unexpected keyword arguments {sorted(unused)}; it takes the fields of "
                "DFMGenerationConfig and `generator`."
            )
        return config

    def adjust_generation_fn(
        self,
        generation_config: Optional[DFMGenerationConfig],
        from_auto_class: bool,
        from_pipeline: Optional[str],
        pretrained_model_name_or_path: Any,
        cache_dir: Any = None,
        force_download: bool = False,
        proxies: Any = None,
        local_files_only: bool = False,
        token: Any = None,
        revision: Optional[str] = None,
        subfolder: str = "",
        **_: Any,
    ) -> None:
        """Called by ``from_pretrained``: ``self.generation_config`` becomes ``generation_config`` (a
        ``from_pretrained`` argument) or the checkpoint's ``generation_config.json``; without either it keeps the
        default made from the model config."""
        if generation_config is not None:
            if not isinstance(generation_config, DFMGenerationConfig):
                raise TypeError(
                    f"`generation_config` must be a DFMGenerationConfig, got {type(generation_config).__name__}."
                )
            self.generation_config = copy.deepcopy(generation_config)
            return
        if pretrained_model_name_or_path is None:
            return
        try:
            self.generation_config = DFMGenerationConfig.from_pretrained(
                pretrained_model_name_or_path,
                cache_dir=cache_dir,
                force_download=force_download,
                proxies=proxies,
                local_files_only=local_files_only,
                token=token,
                revision=revision,
                subfolder=subfolder or "",
                _from_auto=from_auto_class,
                _from_pipeline=from_pipeline,
            )
        except OSError:  # no generation_config.json: keep the default made from the model config
            pass


__all__ = ["DFMGenerateOutput", "DFMGenerationMixin", "check_prompt", "prompt_rows"]
