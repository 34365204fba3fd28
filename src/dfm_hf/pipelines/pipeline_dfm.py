"""`DFMPipeline`: completion, infilling and unconditional generation with a discrete flow model.

The walk of one call: tokenize and lay out ``[prompt | masks]`` rows with a ``condition_mask`` (prompt tokens and
padding never change) -> each step: the scheduler's :meth:`plan_step` says which positions read logits -> the model
runs only on the rows that have such positions and computes its LM head only there (``logits_to_keep``); a step in
which no position can move runs no model at all (exact: its logits would not be read) -> ``scheduler.step`` -> after
the last step, decode.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from ..hub.download import HUB_OPTIONS
from ..rng import check_generator, uniform_tokens_at
from ..schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler
from ..schedulers.utils import validate_num_inference_steps
from . import lora as lora_utils
from .kv_cache import BlockCacheState, validate_kv_cache
from .lora import DFMLoraLoaderMixin
from .presets import default_scheduler_presets, load_presets_from_folder, save_presets
from .runner import ModelRunner

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


class DFMPipeline(DFMLoraLoaderMixin, DiffusionPipeline):
    """Pipeline pairing a :class:`~dfm_hf.DFMForMaskedGeneration`, a scheduler and a tokenizer.

    Components: ``model``, ``scheduler`` (:class:`~dfm_hf.DiscreteFlowScheduler` or
    :class:`~dfm_hf.ConfidenceUnmaskingScheduler`), ``tokenizer`` (optional; needed for text prompts and outputs).
    Named scheduler presets travel with the pipeline under ``scheduler_presets/<name>/scheduler_config.json``.
    """

    model_cpu_offload_seq = "model"
    _optional_components = ["tokenizer"]
    _callback_tensor_inputs = ["sample", "condition_mask"]

    def __init__(self, model: torch.nn.Module, scheduler: Any, tokenizer: Optional[Any] = None) -> None:
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler, tokenizer=tokenizer)
        self.scheduler_presets: dict[str, Any] = default_scheduler_presets(scheduler)

    # ------------------------------------------------------------------ loading and saving
    def register_modules(self, **kwargs: Any) -> None:
        """Register components; dfm_hf classes are recorded as ``["dfm_hf", ClassName]`` in model_index.json
        (diffusers would record the private module path, which would tie checkpoints to our file layout)."""
        super().register_modules(**kwargs)
        self._record_public_library(list(kwargs))

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("model", "scheduler", "tokenizer") and hasattr(self, "_internal_dict"):
            self._record_public_library([name])

    def _record_public_library(self, names: list[str]) -> None:
        fixed = {}
        for name in names:
            entry = self.config.get(name)
            if isinstance(entry, (list, tuple)) and entry[0] and str(entry[0]).startswith("dfm_hf."):
                fixed[name] = ("dfm_hf", entry[1])
        if fixed:
            self.register_to_config(**fixed)

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs: Any) -> str:
        """Fetch a pipeline repo from the Hub with ``huggingface_hub.snapshot_download`` and return its folder.

        diffusers' own ``download`` rejects third-party components; this one fetches only safe files (json,
        safetensors, tokenizer files, scheduler presets, the card: ``dfm_hf.hub.download.PIPELINE_ALLOW_PATTERNS``).
        Pickled weights are fetched only with ``allow_pickle=True``; a repo with nothing else raises ``ValueError``.
        The download arguments of :data:`DOWNLOAD_KWARGS` are passed on; other failures raise an ``OSError`` naming
        the repo, revision and file (see ``dfm_hf.hub.download.download_pipeline``).
        """
        from ..hub.download import download_pipeline

        return download_pipeline(
            pretrained_model_name, allow_pickle=bool(kwargs.pop("allow_pickle", False)), **_download_kwargs(kwargs)
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> DFMPipeline:
        """Load a pipeline from a folder or a Hub repo id (``revision=``, ``dtype=``, ``device_map=`` work).

        A saved DFM pipeline has a ``model_index.json``. A folder or repo without one that holds a released
        diffusion LM (LLaDA, Dream, DiffuCoder: ``config.json`` with ``model_type`` "llada" / "Dream") is converted
        on load: model, its tokenizer (mask token set from the model's mask id), the family's default scheduler and
        presets (see :mod:`dfm_hf.pipelines.released`). Weights load from safetensors only; pass
        ``allow_pickle=True`` to accept a ``pytorch_model.bin`` (``use_safetensors=False`` needs it too). The
        download arguments of :data:`DOWNLOAD_KWARGS` reach the Hub client. A missing folder, file or component
        raises ``OSError`` naming it.
        """
        name = str(pretrained_model_name_or_path)
        allow_pickle = bool(kwargs.pop("allow_pickle", False))
        if kwargs.get("use_safetensors") is False and not allow_pickle:
            raise ValueError(
                "`use_safetensors`=False loads pickled weights, which can run code: pass `allow_pickle=True` too "
                "(only for a source you trust)."
            )
        if not os.path.isdir(name) and (name.startswith(("/", ".", "~")) or name.count("/") > 1 or not name.strip()):
            raise OSError(f"`pretrained_model_name_or_path` {name!r} is neither an existing folder nor a Hub repo id.")
        if os.path.isdir(name):
            folder: Optional[str] = name if os.path.isfile(os.path.join(name, "model_index.json")) else None
        else:
            folder = None if not _repo_has_model_index(name, kwargs) else "download"
        if folder is None:
            return cls._from_released(name, allow_pickle=allow_pickle, **kwargs)
        if folder == "download":
            folder = cls.download(name, allow_pickle=allow_pickle, **kwargs)
        for key in DOWNLOAD_KWARGS:
            kwargs.pop(key, None)
        _check_no_pickle(folder, allow_pickle)
        _check_components_present(folder, name)
        kwargs.setdefault("use_safetensors", None if allow_pickle else True)  # None: safetensors first, else pickle
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=name)
        pipe.scheduler_presets = {**default_scheduler_presets(pipe.scheduler), **load_presets_from_folder(folder)}
        return pipe

    @classmethod
    def _from_released(cls, name: str, **kwargs: Any) -> DFMPipeline:
        """A pipeline around a released diffusion LM converted on load (no ``model_index.json``)."""
        from .released import released_pipeline_components

        components = released_pipeline_components(name, **kwargs)
        return cls._from_components(components, name)

    @classmethod
    def _from_components(cls, components: dict[str, Any], name: str) -> DFMPipeline:
        pipe = cls(model=components["model"], scheduler=components["scheduler"], tokenizer=components["tokenizer"])
        pipe.register_to_config(_name_or_path=name)
        pipe.scheduler_presets = {**pipe.scheduler_presets, **components.get("scheduler_presets", {})}
        return pipe

    @classmethod
    def from_causal_lm(
        cls,
        pretrained_model_name_or_path_or_model: Any,
        mask_token: str = "<|mask|>",
        mask_token_id: Optional[int] = None,
        tokenizer: Any = None,
        **load_kwargs: Any,
    ) -> DFMPipeline:
        """A pipeline around :meth:`DFMForMaskedGeneration.from_causal_lm` (Llama / Mistral / Qwen2 families): the
        converted model, the causal LM's tokenizer with the mask token added (or ``mask_token_id`` reused), the
        default scheduler and the shipped presets. ``load_kwargs`` reach transformers (``gguf_file=``,
        ``revision=``, ``dtype=``). The result needs diffusion adaptation training (``dfm-hf train
        --init_from_causal_lm``) before it generates well.
        """
        from .released import causal_lm_pipeline_components

        components = causal_lm_pipeline_components(
            pretrained_model_name_or_path_or_model,
            mask_token=mask_token,
            mask_token_id=mask_token_id,
            tokenizer=tokenizer,
            **load_kwargs,
        )
        source = pretrained_model_name_or_path_or_model
        name = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
        return cls._from_components(components, str(name))

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs: Any) -> None:
        """Save model, scheduler, tokenizer and scheduler presets; each file lands atomically (temp, then rename).

        Unfused LoRA adapters raise a ``ValueError`` (fuse them with :meth:`fuse_lora` or unload them first);
        fused ones are saved merged into the base weights.
        """
        push_to_hub = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None)
        os.makedirs(save_directory, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=save_directory)
        try:
            with lora_utils.clean_model_for_saving(self):
                super().save_pretrained(tmp, **kwargs)
            save_presets(self.scheduler_presets, tmp)
            _move_tree(tmp, str(save_directory))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if push_to_hub:
            from ..hub import push_pipeline_folder

            push_pipeline_folder(
                self, str(save_directory), repo_id=repo_id or os.path.basename(save_directory), **kwargs
            )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Save into a temp folder and upload it to ``repo_id`` in one commit with a dfm_hf model card; returns the
        ``CommitInfo``.

        ``revision=`` pushes to a branch (created from ``main`` if needed); ``commit_message``, ``private``, ``token``
        are passed on. ``training``, ``metrics``, ``datasets``, ``license``, ``limitations`` fill a fresh card
        (``card=`` replaces it); without them, the card of the local folder the pipeline was loaded from is kept.
        See :func:`dfm_hf.hub.push_pipeline_folder`.
        """
        from ..hub import push_pipeline_to_hub

        return push_pipeline_to_hub(self, repo_id, **kwargs)

    # ------------------------------------------------------------------ presets (LoRA: DFMLoraLoaderMixin)
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
        mask = getattr(self.model.config, "mask_token_id", None)
        if mask is None:
            mask = self.scheduler.config.mask_token_id
        return mask

    def check_components(self) -> None:
        """Raise ``ValueError`` when model, scheduler and tokenizer disagree on the mask id or the vocabulary."""
        mcfg, scfg = self.model.config, self.scheduler.config
        if (
            scfg.mask_token_id is not None
            and mcfg.mask_token_id is not None
            and scfg.mask_token_id != mcfg.mask_token_id
        ):
            raise ValueError(
                f"`scheduler` mask_token_id={scfg.mask_token_id} disagrees with the model's {mcfg.mask_token_id}."
            )
        if scfg.vocab_size is not None and scfg.vocab_size != mcfg.vocab_size:
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

    def prepare_inputs(
        self, prompt: Any = None, input_ids: Any = None, gen_length: int = 0, num_samples_per_prompt: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lay out ``[prompt | gen_length masks]`` rows, right-padded.

        Returns ``(sample, condition_mask, attention_mask, generated_mask)``; ``condition_mask`` is True at given
        tokens and padding, ``generated_mask`` at the positions to generate.
        """
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
            if any(v < 0 or v >= vocab for v in ids):
                raise ValueError(f"`input_ids` must lie in [0, vocab_size={vocab}).")
            if len(ids) + gen_length > max_len:
                raise ValueError(
                    f"prompt ({len(ids)} tokens) + `gen_length` ({gen_length}) = {len(ids) + gen_length} exceeds the "
                    f"model's max_position_embeddings={max_len}."
                )
            row = list(ids) + [mask] * gen_length
            if mask not in row:
                raise ValueError(
                    "The prompt has nothing to generate: `gen_length` is 0 and it holds no mask token to infill."
                )
            rows.extend([row] * num_samples_per_prompt)
        length = max(len(r) for r in rows)
        pad = self._pad_id()
        sample = torch.full((len(rows), length), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            sample[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[b, : len(row)] = 1
        generated = (sample == mask) & attention.bool()
        condition = ~generated
        return sample, condition, attention, generated

    # ------------------------------------------------------------------ call
    @property
    def num_timesteps(self) -> int:
        """Steps of the current (or last) call (read by diffusers' ``PipelineCallback`` cut-offs)."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def guidance_scale(self) -> float:
        """Classifier-free guidance scale of the current (or last) call; a callback may change it between steps."""
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
        kv_cache: Optional[str] = None,
        kv_cache_refresh_steps: Optional[int] = None,
        use_cache: Optional[bool] = None,
    ) -> Union[DFMPipelineOutput, tuple]:
        """Generate.

        Args:
            prompt: a string or list of strings: a prefix to complete (``gen_length`` tokens are appended), and/or
                code holding the tokenizer's mask token at the positions to infill. None: unconditional. Raw text: no
                chat template is applied (use ``messages``).
            input_ids: token ids instead of ``prompt`` (same layout rules).
            gen_length: tokens generated after the prompt (may be 0 when the prompt holds mask tokens).
            num_inference_steps: scheduler steps (an upper bound on model calls); ``nfe`` counts the calls run.
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
            kv_cache: ``None`` (exact), ``"prefix"`` or ``"dual"``: the approximate key/value cache of block
                schedulers (see :mod:`dfm_hf.pipelines.kv_cache`): cached keys/values go stale within a block, so
                it is an approximation; ``kv_cache=None`` is the exact path.
            kv_cache_refresh_steps: with ``kv_cache``, also recompute the cache every ``k`` steps inside a block
                (default: only when a block opens). ``1`` recomputes it every step (exact up to rounding).
            use_cache: deprecated alias of ``skip_idle_steps``.
        """
        if use_cache is not None:
            _warn_use_cache()
            skip_idle_steps = bool(use_cache)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        validate_num_inference_steps(num_inference_steps)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"`guidance_scale` must be a finite number (1.0 = off), got {guidance_scale!r}.")
        if not math.isfinite(guidance_scale):
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
        validate_kv_cache(kv_cache, kv_cache_refresh_steps, scheduler)
        if messages is not None:
            if prompt is not None or input_ids is not None:
                raise ValueError("Pass `messages` or `prompt`/`input_ids`, not both.")
            input_ids = self._chat_ids(messages)
        sample, condition, attention, generated = self.prepare_inputs(
            prompt, input_ids, gen_length, num_samples_per_prompt
        )
        check_generator(generator, sample.shape[0])
        padded = not bool(attention.all())  # checked once per call, on the host tensors
        device = self._execution_device
        if scheduler.config.get("source_distribution", "mask") == "uniform":
            # the source x0 of a uniform-source flow: i.i.d. tokens (never the mask) at the positions to generate
            counts, vocab = generated.sum(1).tolist(), self.model.config.vocab_size
            sample[generated] = uniform_tokens_at(counts, vocab, scheduler.config.mask_token_id, generator, "cpu")
        sample, condition = sample.to(device), condition.to(device)
        attention = attention.to(device) if padded else None
        scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = num_inference_steps
        self._guidance_scale = float(guidance_scale)
        drop = condition & attention.bool() if padded else condition  # given tokens: masked when unconditional
        runner = ModelRunner(
            self.model, self.mask_token_id, attention, drop, skip_idle_steps, use_logits_to_keep, guidance_scale
        )
        kv_state = BlockCacheState(kv_cache, kv_cache_refresh_steps) if kv_cache else None
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            plan = scheduler.plan_step(sample, t, generator=generator, condition_mask=condition)
            if kv_state is not None:
                logits = runner.cached_logits(sample, plan, kv_state)
            else:
                logits = runner.logits(sample, plan)
            sample = scheduler.step(
                logits, t, sample, generator=generator, condition_mask=condition, plan=plan
            ).prev_sample
            del logits  # release this step's logits now: otherwise they stay alive through the next forward pass
            if callback_on_step_end is not None:
                local = {"sample": sample, "condition_mask": condition}
                out = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs}) or {}
                sample = out.get("sample", sample)
        keep = (attention.bool() if padded else torch.ones_like(condition)) if return_full_text else generated
        sample, keep, generated = sample.cpu(), keep.cpu(), generated.cpu()
        sequences = _pack_rows(sample, keep, self._pad_id())
        texts = self._decode(sample, keep, generated) if output_type == "text" else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (sequences, texts, runner.nfe)
        return DFMPipelineOutput(sequences=sequences, texts=texts, nfe=runner.nfe)

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
            raise ValueError(
                "`scheduler` must be a DiscreteFlowScheduler or ConfidenceUnmaskingScheduler, "
                f"got {type(self.scheduler).__name__}."
            )
        overrides = {
            k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)) if v is not None
        }
        if not overrides:
            return self.scheduler
        return type(self.scheduler).from_config(self.scheduler.config, **overrides)

    def _pad_id(self) -> int:
        pad = self.model.config.pad_token_id
        return self.mask_token_id if pad is None else pad

    def _decode(self, sample: torch.Tensor, keep: torch.Tensor, generated: torch.Tensor) -> list[str]:
        eos = self.tokenizer.eos_token_id
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
            texts.append(self.tokenizer.decode(row.tolist(), skip_special_tokens=True))
        return texts


_USE_CACHE_WARNED = False


def _warn_use_cache() -> None:
    global _USE_CACHE_WARNED
    if not _USE_CACHE_WARNED:
        _USE_CACHE_WARNED = True
        warnings.warn(
            "`use_cache` of DFMPipeline.__call__ is deprecated: it never meant a key/value cache. Use "
            "`skip_idle_steps` (same meaning); `kv_cache=` is the approximate key/value cache.",
            FutureWarning,
            stacklevel=4,
        )


def _pack_rows(sample: torch.Tensor, keep: torch.Tensor, pad: int) -> torch.Tensor:
    counts = keep.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((sample.shape[0], width), pad, dtype=sample.dtype, device=sample.device)
    pos = torch.arange(width, device=sample.device).expand(sample.shape[0], width)
    out[pos < counts.unsqueeze(1)] = sample[keep]
    return out


#: Download arguments ``from_pretrained`` / ``download`` pass to the Hub client (``huggingface_hub``).
DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", *HUB_OPTIONS)


def _download_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The download arguments of ``kwargs``; ``proxies`` is refused clearly (huggingface_hub >= 1.0 reads proxies
    from the ``HTTP_PROXY`` / ``HTTPS_PROXY`` environment variables and has no such argument)."""
    if kwargs.get("proxies") is not None:
        raise ValueError(
            "`proxies` is not supported by huggingface_hub >= 1.0: set the HTTP_PROXY / HTTPS_PROXY environment "
            "variables instead."
        )
    return {k: kwargs[k] for k in DOWNLOAD_KWARGS if k in kwargs and k != "proxies"}


def _repo_has_model_index(repo_id: str, kwargs: dict[str, Any]) -> bool:
    """Whether Hub repo ``repo_id`` holds a ``model_index.json`` (a saved pipeline) rather than a bare model.

    Anything but a definite "no such file" answers True, so that the pipeline download reports the error itself.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hub = _download_kwargs(kwargs)
    hub.pop("local_dir", None)
    try:
        hf_hub_download(repo_id, "model_index.json", **hub)
        return True
    except EntryNotFoundError:
        return False
    except LocalEntryNotFoundError:
        try:  # offline: a cached bare model has its config.json in the cache
            hf_hub_download(repo_id, "config.json", **{**hub, "local_files_only": True})
            return False
        except Exception:
            return True
    except Exception:
        return True


def _check_components_present(folder: str, name: str) -> None:
    """Raise ``OSError`` naming the folder or file when a component ``model_index.json`` lists is missing."""
    import json

    path = os.path.join(folder, "model_index.json")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise OSError(f"{path} of DFM pipeline {name!r} cannot be read: {err}") from err
    if not isinstance(index, dict):
        raise OSError(f"{path} of DFM pipeline {name!r} must hold a JSON object.")
    needs = {"model": ("config.json",), "scheduler": ("scheduler_config.json",), "tokenizer": None}
    for component, files in needs.items():
        entry = index.get(component)
        if not isinstance(entry, (list, tuple)) or entry[0] is None:
            continue
        sub = os.path.join(folder, component)
        if not os.path.isdir(sub):
            raise OSError(
                f"DFM pipeline {name!r}: the {component!r} folder {sub} is missing (model_index.json lists it)."
            )
        if files is None:  # a tokenizer: at least its config and one vocabulary file
            present = set(os.listdir(sub))
            if "tokenizer_config.json" not in present:
                raise OSError(f"DFM pipeline {name!r}: {os.path.join(sub, 'tokenizer_config.json')} is missing.")
            vocab = (
                "tokenizer.json",
                "vocab.json",
                "tokenizer.model",
                "vocab.txt",
                "spiece.model",
                "sentencepiece.bpe.model",
            )
            if not present.intersection(vocab):
                raise OSError(
                    f"DFM pipeline {name!r}: the tokenizer folder {sub} has no vocabulary file (one of {list(vocab)})."
                )
            continue
        for f in files:
            if not os.path.isfile(os.path.join(sub, f)):
                raise OSError(f"DFM pipeline {name!r}: {os.path.join(sub, f)} is missing.")


def _check_no_pickle(folder: str, allow_pickle: bool) -> None:
    if allow_pickle:
        return
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
                safetensors = [g for g in files if g.endswith(".safetensors")]
                if not safetensors:
                    raise ValueError(
                        f"{os.path.join(root, f)} is a pickle file and no safetensors weights sit beside it; "
                        "pickles can run code on load. Pass `allow_pickle=True` only for a source you trust."
                    )


def _move_tree(src: str, dst: str) -> None:
    """Move every file of ``src`` into ``dst`` with ``os.replace`` (atomic per file)."""
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target_dir = os.path.normpath(os.path.join(dst, rel))
        os.makedirs(target_dir, exist_ok=True)
        for f in files:
            os.replace(os.path.join(root, f), os.path.join(target_dir, f))
