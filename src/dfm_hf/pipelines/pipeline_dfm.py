"""`DFMPipeline`: completion, infilling and unconditional generation with a discrete flow model.

The walk of one call: tokenize and lay out ``[prompt | masks]`` rows with a ``condition_mask`` (prompt tokens and
padding never change) -> each step: the scheduler's :meth:`plan_step` says which positions read logits -> the model
runs only on the rows that have such positions and computes its LM head only there (``logits_to_keep``); a step in
which no position can move runs no model at all (exact: its logits would not be read) -> ``scheduler.step`` -> after
the last step, decode.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler
from ..schedulers.sampling import check_generator
from . import lora as lora_utils
from .presets import default_scheduler_presets, load_presets_from_folder, save_presets

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


class DFMPipeline(DiffusionPipeline):
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
        safetensors, tokenizer files, scheduler presets, the card: ``dfm_hf.hub.PIPELINE_ALLOW_PATTERNS``). Pickled
        weights are fetched only with ``allow_pickle=True``; a repo with nothing else raises ``ValueError``. Other
        failures raise an ``OSError`` naming the repo, revision and file (see ``dfm_hf.hub.download_pipeline``).
        """
        from ..hub import download_pipeline

        return download_pipeline(
            pretrained_model_name,
            allow_pickle=bool(kwargs.get("allow_pickle", False)),
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only", False)),
            force_download=bool(kwargs.get("force_download", False)),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> DFMPipeline:
        """Load a saved pipeline from a folder or a Hub repo id (``revision=``, ``dtype=``, ``device_map=`` work).

        Weights load from safetensors only; pass ``allow_pickle=True`` to accept a ``pytorch_model.bin``.
        """
        name = str(pretrained_model_name_or_path)
        allow_pickle = bool(kwargs.pop("allow_pickle", False))
        if os.path.isdir(name):
            folder = name
        elif name.startswith(("/", ".", "~")) or name.count("/") > 1 or not name.strip():
            raise ValueError(f"`pretrained_model_name_or_path` {name!r} is neither a folder nor a Hub repo id.")
        else:
            download_keys = ("revision", "cache_dir", "token", "local_files_only", "force_download")
            folder = cls.download(
                name, allow_pickle=allow_pickle, **{k: kwargs[k] for k in download_keys if k in kwargs}
            )
            kwargs.pop("revision", None)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ValueError(f"`pretrained_model_name_or_path` {name!r} has no model_index.json: not a DFM pipeline.")
        _check_no_pickle(folder, allow_pickle)
        kwargs["use_safetensors"] = None if allow_pickle else True  # None: safetensors first, else the pickle
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=name)
        pipe.scheduler_presets = {**default_scheduler_presets(pipe.scheduler), **load_presets_from_folder(folder)}
        return pipe

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

    # ------------------------------------------------------------------ presets and LoRA
    def load_scheduler_preset(self, name: str) -> Any:
        """Replace ``self.scheduler`` by the named preset (see ``self.scheduler_presets``) and return it."""
        if name not in self.scheduler_presets:
            raise ValueError(f"`name` must be one of the presets {sorted(self.scheduler_presets)}, got {name!r}.")
        preset = self.scheduler_presets[name]
        self.scheduler = type(preset).from_config(preset.config)
        return self.scheduler

    def load_lora_weights(
        self, pretrained_model_name_or_path: Union[str, os.PathLike], adapter_name: Optional[str] = None, **kwargs: Any
    ) -> None:
        """Load a PEFT LoRA adapter (folder or Hub id with ``adapter_config.json`` + safetensors) into the model."""
        lora_utils.load_lora_weights(self.model, str(pretrained_model_name_or_path), adapter_name, **kwargs)

    def set_adapters(
        self, adapter_names: Union[str, list[str]], adapter_weights: Optional[Union[float, list[float]]] = None
    ) -> None:
        """Activate the named adapters, optionally with per-adapter weights (scale of the LoRA update)."""
        lora_utils.set_adapters(self.model, adapter_names, adapter_weights)

    def fuse_lora(self, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active (or named) adapters into the base weights."""
        lora_utils.fuse_lora(self.model, adapter_names)

    def unfuse_lora(self) -> None:
        """Undo :meth:`fuse_lora`."""
        lora_utils.unfuse_lora(self.model)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the model becomes exactly the base model again (unfused adapters leave no trace)."""
        lora_utils.unload_lora_weights(self.model)

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
        pad = self.model.config.pad_token_id
        pad = mask if pad is None else pad
        sample = torch.full((len(rows), length), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            sample[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[b, : len(row)] = 1
        generated = (sample == mask) & attention.bool()
        condition = ~generated
        return sample, condition, attention, generated

    # ------------------------------------------------------------------ call
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
        use_cache: bool = True,
        use_logits_to_keep: bool = True,
    ) -> Union[DFMPipelineOutput, tuple]:
        """Generate.

        Args:
            prompt: a string or list of strings: a prefix to complete (``gen_length`` tokens are appended), and/or
                code holding the tokenizer's mask token at the positions to infill. None: unconditional.
            input_ids: token ids instead of ``prompt`` (same layout rules).
            gen_length: tokens generated after the prompt (may be 0 when the prompt holds mask tokens).
            num_inference_steps: scheduler steps; ``nfe`` in the output counts the model calls actually run.
            num_samples_per_prompt: rows per prompt.
            temperature, top_k, top_p: override the scheduler's values for this call.
            generator: one ``torch.Generator`` or one per output row (then a row does not depend on the batch).
            output_type: ``"text"`` (sequences and texts) or ``"pt"`` (sequences only).
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each step; it may
                return a new ``"sample"``.
            return_full_text: False returns only the generated positions.
            use_cache: skip the model at steps (and rows) where no position can move (exact). False runs the full
                model at every step, as a reference.
            use_logits_to_keep: compute the LM head only where the step reads logits.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        tensor_inputs = callback_on_step_end_tensor_inputs or []
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may hold {self._callback_tensor_inputs}, got {bad}."
            )
        if output_type == "text" and self.tokenizer is None:
            raise ValueError("`output_type`='text' needs a `tokenizer` component; use output_type='pt'.")
        scheduler = self._scheduler_for_call(temperature, top_k, top_p)
        sample, condition, attention, generated = self.prepare_inputs(
            prompt, input_ids, gen_length, num_samples_per_prompt
        )
        check_generator(generator, sample.shape[0])
        device = self._execution_device
        sample, condition, attention = sample.to(device), condition.to(device), attention.to(device)
        scheduler.set_timesteps(num_inference_steps, device=device)
        time_conditioned = bool(getattr(self.model.config, "time_conditioning", False))
        nfe = 0
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            needs = scheduler.plan_step(sample, t, generator, condition)
            if use_cache:
                rows = needs.any(1)
                if not bool(rows.any()):
                    logits = sample.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
                else:
                    all_rows = bool(rows.all())
                    sel = slice(None) if all_rows else rows
                    logits = self.model(
                        input_ids=sample[sel],
                        timesteps=t.expand(int(rows.sum())) if time_conditioned else None,
                        attention_mask=attention[sel],
                        logits_to_keep=needs[sel] if use_logits_to_keep else None,
                    ).logits
                    if not use_logits_to_keep:
                        logits = logits[needs[sel]]
                    nfe += 1
            else:
                logits = self.model(
                    input_ids=sample,
                    timesteps=t.expand(sample.shape[0]) if time_conditioned else None,
                    attention_mask=attention,
                ).logits
                nfe += 1
            sample = scheduler.step(logits, t, sample, generator=generator, condition_mask=condition).prev_sample
            del logits  # release this step's logits now: otherwise they stay alive through the next forward pass
            if callback_on_step_end is not None:
                local = {"sample": sample, "condition_mask": condition}
                out = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs}) or {}
                sample = out.get("sample", sample)
        texts = None
        keep = attention.bool() if return_full_text else generated.to(device)
        sequences = _pack_rows(sample, keep, self._pad_id())
        if output_type == "text":
            texts = self._decode(sample, keep, generated.to(device))
        self.maybe_free_model_hooks()
        if not return_dict:
            return (sequences, texts, nfe)
        return DFMPipelineOutput(sequences=sequences.cpu(), texts=texts, nfe=nfe)

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


def _pack_rows(sample: torch.Tensor, keep: torch.Tensor, pad: int) -> torch.Tensor:
    counts = keep.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((sample.shape[0], width), pad, dtype=sample.dtype, device=sample.device)
    pos = torch.arange(width, device=sample.device).expand(sample.shape[0], width)
    out[pos < counts.unsqueeze(1)] = sample[keep]
    return out


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
