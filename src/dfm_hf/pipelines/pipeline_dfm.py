"""`DFMPipeline`: completion, infilling and unconditional generation with a discrete flow model.

The walk of one call: tokenize and lay out ``[prompt | masks]`` rows with a ``condition_mask`` (prompt tokens and
padding never change) -> each step: the scheduler's :meth:`plan_step` says which positions read logits -> the model
runs only on the rows that have such positions and computes its LM head only there (``logits_to_keep``); a step in
which no position can move runs no model at all (exact: its logits would not be read) -> ``scheduler.step`` -> after
the last step, decode. A block-diffusion model (``config.block_size``) runs the block-by-block loop of
:mod:`~dfm_hf.generation.block_diffusion` instead, with its exact key/value cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from ..generation.block_diffusion import generate_blocks
from ..generation.call import SamplingCall, eos_token_ids
from ..generation.fim import fim_infill_plan, generate_fim_blocks
from ..generation.full_attention import generate_full_attention, pack_rows, right_padded
from ..generation.kv_cache import resolve_kv_cache
from ..generation.utils import check_prompt
from ..rng import check_generator
from ..schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler
from ..schedulers.presets import default_scheduler_presets
from ..schedulers.utils import validate_num_inference_steps
from .foreign_schedulers import adapt_scheduler
from .loading import DFMPipelineLoadingMixin
from .lora import DFMLoraLoaderMixin

OUTPUT_TYPES = ("text", "pt")
MAX_ROWS = 65_536  # rows per call: a bound so that no argument can make the pipeline allocate without limit


@dataclass
class DFMPipelineOutput(BaseOutput):
    """Output of :class:`DFMPipeline`.

    Args:
        sequences: (rows, length) LongTensor of token ids (prompt included and holes filled, unless
            ``return_full_text=False``), right-padded with the pad id.
        texts: decoded strings (text after the first EOS of the completion dropped), or None for ``output_type="pt"``.
        nfe: number of model forward passes run.
    """

    sequences: torch.LongTensor
    texts: Optional[list[str]]
    nfe: int


class DFMPipeline(DFMPipelineLoadingMixin, DFMLoraLoaderMixin, DiffusionPipeline):
    """Pipeline pairing a :class:`~dfm_hf.DFMForMaskedGeneration`, a scheduler and a tokenizer.

    Components: ``model``, ``scheduler`` (:class:`~dfm_hf.DiscreteFlowScheduler`,
    :class:`~dfm_hf.ConfidenceUnmaskingScheduler`, or diffusers' ``BlockRefinementScheduler``,
    ``EntropyBoundScheduler``, ``DiscreteDDIMScheduler``: see :mod:`~dfm_hf.pipelines.foreign_schedulers`),
    ``tokenizer`` (optional; needed for text prompts and outputs).
    Named scheduler presets travel with the pipeline under ``scheduler_presets/<name>/scheduler_config.json``.
    Loading and saving: :class:`~dfm_hf.pipelines.loading.DFMPipelineLoadingMixin`; LoRA adapters:
    :class:`~dfm_hf.pipelines.lora.DFMLoraLoaderMixin`.
    """

    model_cpu_offload_seq = "model"
    _optional_components = ["tokenizer"]
    _callback_tensor_inputs = ["sample", "condition_mask"]

    def __init__(self, model: torch.nn.Module, scheduler: Any, tokenizer: Optional[Any] = None) -> None:
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler, tokenizer=tokenizer)
        self.scheduler_presets: dict[str, Any] = default_scheduler_presets(scheduler)

    # ------------------------------------------------------------------ presets
    def load_scheduler_preset(self, name: str) -> Any:
        """Replace ``self.scheduler`` by the named preset (see ``self.scheduler_presets``) and return it."""
        if name not in self.scheduler_presets:
            raise ValueError(f"`name` must be one of the presets {sorted(self.scheduler_presets)}, got {name!r}.")
        preset = self.scheduler_presets[name]
        self.scheduler = type(preset).from_config(preset.config)
        return self.scheduler

    # ------------------------------------------------------------------ inputs
    @property
    def mask_token_id(self) -> int:
        """The mask token id: the model's, or the scheduler's when the model config has none."""
        mask = getattr(self.model.config, "mask_token_id", None)
        if mask is None:
            mask = self.scheduler.config.get("mask_token_id")
        return mask

    def check_components(self) -> None:
        """Raise ``ValueError`` when model, scheduler and tokenizer disagree on the mask id or the vocabulary."""
        mcfg, scfg = self.model.config, self.scheduler.config
        if (
            scfg.get("mask_token_id") is not None
            and mcfg.mask_token_id is not None
            and scfg.get("mask_token_id") != mcfg.mask_token_id
        ):
            raise ValueError(
                f"`scheduler` mask_token_id={scfg.mask_token_id} disagrees with the model's {mcfg.mask_token_id}."
            )
        if scfg.get("vocab_size") is not None and scfg.vocab_size != mcfg.vocab_size:
            raise ValueError(f"`scheduler` vocab_size={scfg.vocab_size} disagrees with the model's {mcfg.vocab_size}.")
        if self.tokenizer is not None:
            if self.tokenizer.mask_token_id is None:
                raise ValueError("`tokenizer` has no mask token; DFM prompts and infilling need one.")
            if self.tokenizer.mask_token_id != self.mask_token_id:
                raise ValueError(
                    f"`tokenizer` mask token id {self.tokenizer.mask_token_id} disagrees with the model's "
                    f"{self.mask_token_id}."
                )
            if len(self.tokenizer) > mcfg.vocab_size:
                raise ValueError(
                    f"`tokenizer` has {len(self.tokenizer)} tokens, more than the model's {mcfg.vocab_size}."
                )

    def _prompt_ids(self, prompt: Any, input_ids: Any) -> list[list[int]]:
        if prompt is not None and input_ids is not None:
            raise ValueError("Pass either `prompt` or `input_ids`, not both.")
        if input_ids is not None:
            if isinstance(input_ids, torch.Tensor):
                if input_ids.dim() == 1:
                    input_ids = input_ids.unsqueeze(0)
                if input_ids.dim() != 2 or input_ids.is_floating_point():
                    raise ValueError("`input_ids` must be a (batch, length) integer tensor or a list of id lists.")
                return [row.tolist() for row in input_ids]
            if isinstance(input_ids, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in input_ids):
                rows = [list(r) for r in input_ids]
                if not all(isinstance(v, int) and not isinstance(v, bool) for r in rows for v in r):
                    raise ValueError("`input_ids` must hold integer token ids.")
                return rows
            raise ValueError("`input_ids` must be a (batch, length) integer tensor or a list of id lists.")
        if prompt is None:
            return [[]]
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("`prompt` must be a string or a non-empty list of strings.")
        if self.tokenizer is None:
            raise ValueError("`prompt` needs a `tokenizer` component; pass `input_ids` instead.")
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def prompt_rows(
        self, prompt: Any = None, input_ids: Any = None, gen_length: int = 0, num_samples_per_prompt: int = 1
    ) -> list[list[int]]:
        """The token ids of every output row's prompt (each prompt repeated ``num_samples_per_prompt`` times),
        checked against the model: ids in the vocabulary, prompt + ``gen_length`` within the positions, something to
        generate."""
        if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length < 0:
            raise ValueError(f"`gen_length` must be an integer >= 0, got {gen_length!r}.")
        if isinstance(num_samples_per_prompt, bool) or not isinstance(num_samples_per_prompt, int):
            raise ValueError(f"`num_samples_per_prompt` must be an integer >= 1, got {num_samples_per_prompt!r}.")
        if not 1 <= num_samples_per_prompt <= MAX_ROWS:
            raise ValueError(f"`num_samples_per_prompt` must lie in [1, {MAX_ROWS}], got {num_samples_per_prompt!r}.")
        self.check_components()
        mask, vocab = self.mask_token_id, self.model.config.vocab_size
        max_len = self.model.config.max_position_embeddings
        rows = []
        prompts = self._prompt_ids(prompt, input_ids)
        if len(prompts) * num_samples_per_prompt > MAX_ROWS:
            raise ValueError(
                f"{len(prompts)} prompts x `num_samples_per_prompt`={num_samples_per_prompt} exceeds {MAX_ROWS} rows "
                "per call; split the batch."
            )
        for ids in prompts:
            check_prompt(ids, gen_length, mask, vocab, max_len)
            rows.extend([list(ids)] * num_samples_per_prompt)
        return rows

    def prepare_inputs(
        self, prompt: Any = None, input_ids: Any = None, gen_length: int = 0, num_samples_per_prompt: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lay out ``[prompt | gen_length masks]`` rows, right-padded (the layout of a full-attention model; a
        block-diffusion model lays its rows out on its block grid, see :mod:`~dfm_hf.generation.block_diffusion`).

        Returns ``(sample, condition_mask, attention_mask, generated_mask)``; ``condition_mask`` is True at given
        tokens and padding, ``generated_mask`` at the positions to generate.
        """
        prompts = self.prompt_rows(prompt, input_ids, gen_length, num_samples_per_prompt)
        return right_padded(prompts, gen_length, self.mask_token_id, self._pad_id())

    # ------------------------------------------------------------------ call
    @property
    def num_timesteps(self) -> int:
        """Steps of the current (or last) call (read by diffusers' ``PipelineCallback`` cut-offs)."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def guidance_scale(self) -> float:
        """Classifier-free guidance scale of the current (or last) call (frozen for the call: the batch layout of the
        guided forward depends on it)."""
        return getattr(self, "_guidance_scale", 1.0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[Union[str, list[str]]] = None,
        input_ids: Optional[Union[torch.Tensor, list[list[int]]]] = None,
        gen_length: int = 64,
        num_inference_steps: int = 64,
        num_samples_per_prompt: int = 1,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        output_type: str = "text",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., dict]] = None,
        callback_on_step_end_tensor_inputs: Optional[list[str]] = None,
        return_full_text: bool = True,
        skip_idle_steps: bool = True,
        use_logits_to_keep: bool = True,
        messages: Optional[Union[list[dict[str, str]], list[list[dict[str, str]]]]] = None,
        guidance_scale: float = 1.0,
        kv_cache: Optional[str] = "auto",
        kv_cache_refresh_steps: Optional[int] = None,
        streamer: Optional[Any] = None,
    ) -> Union[DFMPipelineOutput, tuple]:
        """Generate.

        Args:
            prompt: a string or list of strings: a prefix to complete (``gen_length`` tokens are appended), and/or
                code holding the tokenizer's mask token at the positions to infill (a block-diffusion model infills
                one run of masks per prompt through its FIM tokens, ``config.fim_token_ids``, and appends nothing:
                see :mod:`~dfm_hf.generation.fim`). None: unconditional. Raw text: no chat template is applied (use
                ``messages``).
            input_ids: token ids instead of ``prompt`` (same layout rules).
            gen_length: tokens generated after the prompt (may be 0 when the prompt holds mask tokens).
            num_inference_steps: scheduler steps (an upper bound on model calls); ``nfe`` counts the calls run. A
                block-diffusion model splits them over each row's blocks (see
                :mod:`~dfm_hf.generation.block_diffusion`). Not binding under Fast-dLLM's threshold rule
                (``ConfidenceUnmaskingScheduler(threshold_rule="top1")``): the scheduler's ``inference_steps`` sets
                the count, one step per position of a window.
            num_samples_per_prompt: rows per prompt.
            temperature, top_k, top_p: override the scheduler's values for this call.
            generator: one ``torch.Generator``, or one per output row. Row ``b`` of a list reads only
                ``generator[b]``, so a batch with one generator per row gives, row for row, the solo calls made with
                each row's generator; a single generator on one row is the same as a list of it. Draws are made on
                the generator's device (a CPU generator drives a GPU run and gives the same tokens).
            output_type: ``"text"`` (sequences and texts) or ``"pt"`` (sequences only).
            return_dict: a :class:`DFMPipelineOutput` (default) or the tuple ``(sequences, texts, nfe)``; either way
                ``sequences`` is on the CPU.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each step, or a
                diffusers ``PipelineCallback`` / ``MultiPipelineCallbacks`` (their ``tensor_inputs`` are used); it
                may return a new ``"sample"``.
            callback_on_step_end_tensor_inputs: names from ``_callback_tensor_inputs`` passed to a plain callback.
            return_full_text: False returns only the generated positions.
            skip_idle_steps: skip the model at steps (and rows) where no position can move (exact: those logits
                would not be read). False runs the full model at every step, as a reference.
            use_logits_to_keep: compute the LM head only where the step reads logits.
            messages: a chat conversation (list of ``{"role", "content"}``) or a list of them: the tokenizer's chat
                template with the generation prompt is applied and the reply generated. Exclusive with ``prompt``.
            guidance_scale: classifier-free guidance ``logits = uncond + guidance_scale * (cond - uncond)``
                (diffusers' convention; 1.0 = off; LLaDA's ``cfg_scale`` is ``guidance_scale - 1``). The
                unconditional branch is the same rows with every conditioning token (prompt, infill context) replaced
                by the mask token; both branches run in one batched forward.
            kv_cache: ``"auto"`` (default): the exact key/value cache of a block-diffusion model (``config.
                block_size`` set; see :mod:`dfm_hf.generation.block_diffusion`), none for a full-attention model.
                ``None``: no cache (the exact path; a block model then recomputes the prefix at every step, with the
                same tokens). ``"prefix"`` or ``"dual"`` (full-attention models with a block scheduler): the
                approximate key/value cache (see :mod:`dfm_hf.generation.kv_cache`): cached keys/values go stale
                within a block, so it is an approximation.
            kv_cache_refresh_steps: with ``kv_cache``, also recompute the cache every ``k`` steps inside a block
                (default: only when a block opens). ``1`` recomputes it every step (exact up to rounding).
            streamer: receives the prompt, every draft and the final tokens (transformers' ``TextDiffusionStreamer``
                protocol: ``put``, ``put_draft`` after each step that ran the model, ``end``; see
                :mod:`dfm_hf.generation.streamers`).

        Every setting is read once, when the call starts: a callback changing the pipeline's attributes (its
        scheduler, ``_guidance_scale``) affects the next call, never the batch layout or sampler of this one.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        flags = {"return_dict": return_dict, "return_full_text": return_full_text}
        flags.update(skip_idle_steps=skip_idle_steps, use_logits_to_keep=use_logits_to_keep)
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r}.")
        validate_num_inference_steps(num_inference_steps)
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"`guidance_scale` must be a finite number (1.0 = off), got {guidance_scale!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or [])
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may hold {self._callback_tensor_inputs}, got {bad}."
            )
        if output_type == "text" and self.tokenizer is None:
            raise ValueError("`output_type`='text' needs a `tokenizer` component; use output_type='pt'.")
        scheduler = self._scheduler_for_call(temperature, top_k, top_p)
        cache_mode = resolve_kv_cache(kv_cache, kv_cache_refresh_steps, scheduler, self.model.config)
        if messages is not None:
            if prompt is not None or input_ids is not None:
                raise ValueError("Pass `messages` or `prompt`/`input_ids`, not both.")
            input_ids = self._chat_ids(messages)
        prompts = self.prompt_rows(prompt, input_ids, gen_length, num_samples_per_prompt)
        block_size = getattr(self.model.config, "block_size", None)
        infill = fim_infill_plan(prompts, self.mask_token_id, self.model.config) if block_size is not None else None
        check_generator(generator, len(prompts))
        self._num_timesteps = num_inference_steps
        self._guidance_scale = float(guidance_scale)
        pad, tokenizer = self._pad_id(), self.tokenizer  # read once, like every setting of the call
        call = SamplingCall(
            model=self.model,
            mask_token_id=self.mask_token_id,
            pad_token_id=pad,
            device=self._execution_device,
            eos_token_ids=eos_token_ids(tokenizer, self.model.config),
            progress_bar=self.progress_bar,
            callback_owner=self,
            set_num_timesteps=self._set_num_timesteps,
        )
        common = dict(
            scheduler=scheduler,
            prompts=prompts,
            gen_length=gen_length,
            num_inference_steps=num_inference_steps,
            generator=generator,
            guidance_scale=guidance_scale,
            skip_idle_steps=skip_idle_steps,
            use_logits_to_keep=use_logits_to_keep,
            callback=callback_on_step_end,
            tensor_inputs=tensor_inputs,
            return_full_text=return_full_text,
            streamer=streamer,
        )
        if block_size is not None:
            cached = cache_mode == "block"
            if infill is None:
                result = generate_blocks(call, cached=cached, **common)
            else:  # a block model with FIM tokens: the run of masks infilled through the FIM layout (generation.fim)
                result = generate_fim_blocks(call, infill, cached=cached, **common)
        else:
            result = generate_full_attention(
                call, kv_cache=cache_mode, kv_cache_refresh_steps=kv_cache_refresh_steps, **common
            )
        sample, keep, generated, nfe = result.sample, result.keep, result.generated, result.nfe
        sequences = pack_rows(sample, keep, pad)
        texts = _decode(tokenizer, sample, keep, generated) if output_type == "text" else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (sequences, texts, nfe)
        return DFMPipelineOutput(sequences=sequences, texts=texts, nfe=nfe)

    def _chat_ids(self, messages: Any) -> list[list[int]]:
        """Token ids of each conversation with the tokenizer's chat template and the generation prompt applied."""
        if self.tokenizer is None:
            raise ValueError("`messages` needs a `tokenizer` component with a chat template.")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(
                "`messages` must be a conversation (a list of {'role', 'content'} dicts) or a list of them."
            )
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        for conv in conversations:
            if (
                not isinstance(conv, (list, tuple))
                or not conv
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conv)
            ):
                raise ValueError(
                    "`messages` must be a conversation (a list of {'role', 'content'} dicts) or a list of them."
                )
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("`messages` needs a tokenizer with a chat template (`tokenizer.chat_template` is unset).")
        ids = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(list(conv), add_generation_prompt=True, tokenize=False)
            ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids

    def _scheduler_for_call(self, temperature: Any, top_k: Any, top_p: Any) -> Any:
        if not isinstance(self.scheduler, (DiscreteFlowScheduler, ConfidenceUnmaskingScheduler)):
            config = self.model.config  # a diffusers discrete scheduler runs through an adapter (foreign_schedulers)
            block_size = getattr(config, "block_size", None)
            return adapt_scheduler(
                self.scheduler, self.mask_token_id, config.vocab_size, block_size, temperature, top_k, top_p
            )
        overrides = {
            k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)) if v is not None
        }
        if not overrides:
            return self.scheduler
        return type(self.scheduler).from_config(self.scheduler.config, **overrides)

    def _set_num_timesteps(self, num_timesteps: int) -> None:
        self._num_timesteps = num_timesteps

    def _pad_id(self) -> int:
        pad = self.model.config.pad_token_id
        return self.mask_token_id if pad is None else pad


def _decode(tokenizer: Any, sample: torch.Tensor, keep: torch.Tensor, generated: torch.Tensor) -> list[str]:
    """The text of each row's kept positions, cut at the first EOS the completion generated."""
    eos = tokenizer.eos_token_id
    texts = []
    for b in range(sample.shape[0]):
        ids = sample[b]
        cut = ids.shape[0]
        if eos is not None:
            # the completion is the generated tail after the last given token
            given = (~generated[b] & keep[b]).nonzero()
            tail_start = int(given[-1]) + 1 if given.numel() else 0
            hits = ((ids == eos) & generated[b]).nonzero().squeeze(-1)
            hits = hits[hits >= tail_start]
            if hits.numel():
                cut = int(hits[0])
        row = ids[:cut][keep[b, :cut]]
        texts.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return texts
