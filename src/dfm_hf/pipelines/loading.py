"""Loading and saving policy of :class:`~dfm_hf.pipelines.DFMPipeline` (:class:`DFMPipelineLoadingMixin`).

- ``model_index.json`` names dfm_hf components as ``["dfm_hf", ClassName]`` (the public library, never a private
  module path), so diffusers' ``from_pretrained`` finds each class by name on the ``dfm_hf`` package.
- Loading: a folder or Hub repo with ``model_index.json`` is a saved pipeline; one without it holds a released
  diffusion LM, converted on load (:mod:`dfm_hf.pipelines.released`). Only safe files are downloaded, weights load from
  safetensors unless ``allow_pickle=True``, and a missing component raises ``OSError`` naming the folder or file.
- Saving: every file is written into a temp folder, then moved into place with ``os.replace`` (atomic per file).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional, Union

from ..hub.download import DOWNLOAD_ARGUMENTS, HUB_OPTIONS, PICKLE_SUFFIXES, download_pipeline, is_repo_id
from ..hub.push import push_pipeline_folder, push_pipeline_to_hub
from ..models.loading import check_quantization_config
from ..schedulers.presets import default_scheduler_presets, load_presets_from_folder, save_presets
from .lora import clean_model_for_saving

#: Download arguments ``from_pretrained`` / ``download`` pass to the Hub client (``huggingface_hub``).
DOWNLOAD_KWARGS = (*DOWNLOAD_ARGUMENTS, "proxies", *HUB_OPTIONS)
#: Vocabulary files a saved tokenizer has at least one of.
TOKENIZER_VOCAB_FILES = (
    "tokenizer.json",
    "vocab.json",
    "tokenizer.model",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_COMPONENTS = ("model", "scheduler", "tokenizer")


class DFMPipelineLoadingMixin:
    """``from_pretrained`` / ``from_causal_lm`` / ``download`` / ``save_pretrained`` / ``push_to_hub`` of a DFM
    pipeline, on top of diffusers' ``DiffusionPipeline`` (which must follow this mixin in the bases)."""

    def register_modules(self, **kwargs: Any) -> None:
        """Register components; dfm_hf classes are recorded as ``["dfm_hf", ClassName]`` in model_index.json
        (diffusers would record the private module path, which would tie checkpoints to our file layout)."""
        super().register_modules(**kwargs)
        self._record_public_library(list(kwargs))

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _COMPONENTS and hasattr(self, "_internal_dict"):
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
        allow_pickle = bool(kwargs.pop("allow_pickle", False))
        return download_pipeline(pretrained_model_name, allow_pickle=allow_pickle, **_download_kwargs(kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> Any:
        """Load a pipeline from a folder or a Hub repo id (``revision=``, ``dtype=``, ``device_map=`` work).

        A saved DFM pipeline has a ``model_index.json``. A folder or repo without one that holds a released
        diffusion LM (LLaDA, Dream, DiffuCoder: ``config.json`` with ``model_type`` "llada" / "Dream") is converted
        on load: model, its tokenizer (mask token set from the model's mask id), the family's default scheduler and
        presets (see :mod:`dfm_hf.pipelines.released`). Weights load from safetensors only; pass
        ``allow_pickle=True`` to accept a ``pytorch_model.bin`` (``use_safetensors=False`` needs it too). The
        download arguments of :data:`DOWNLOAD_KWARGS` reach the Hub client. A missing folder, file or component
        raises ``OSError`` naming it. ``quantization_config=`` (a transformers ``TorchAoConfig`` or
        ``BitsAndBytesConfig``; for a saved pipeline also diffusers' ``PipelineQuantizationConfig``) quantizes the
        model while it loads (see ``DFMForMaskedGeneration.from_pretrained``).
        """
        name = str(pretrained_model_name_or_path)
        allow_pickle = bool(kwargs.pop("allow_pickle", False))
        quantization = kwargs.pop("quantization_config", None)
        if kwargs.get("use_safetensors") is False and not allow_pickle:
            raise ValueError(
                "`use_safetensors`=False loads pickled weights, which can run code: pass `allow_pickle=True` too "
                "(only for a source you trust)."
            )
        if not os.path.isdir(name) and not is_repo_id(name):
            raise OSError(f"`pretrained_model_name_or_path` {name!r} is neither an existing folder nor a Hub repo id.")
        if os.path.isdir(name):
            folder: Optional[str] = name if os.path.isfile(os.path.join(name, "model_index.json")) else None
        else:
            folder = None if not _repo_has_model_index(name, kwargs) else "download"
        if folder is None:
            return cls._from_released(name, allow_pickle=allow_pickle, quantization_config=quantization, **kwargs)
        if folder == "download":
            folder = cls.download(name, allow_pickle=allow_pickle, **kwargs)
        for key in DOWNLOAD_KWARGS:
            kwargs.pop(key, None)
        _check_no_pickle(folder, allow_pickle)
        _check_components_present(folder, name)
        kwargs.setdefault("use_safetensors", None if allow_pickle else True)  # None: safetensors first, else pickle
        if quantization is not None:
            kwargs["quantization_config"] = _pipeline_quantization(quantization)
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=name)
        pipe.scheduler_presets = {**default_scheduler_presets(pipe.scheduler), **load_presets_from_folder(folder)}
        return pipe

    @classmethod
    def _from_released(cls, name: str, **kwargs: Any) -> Any:
        """A pipeline around a released diffusion LM converted on load (no ``model_index.json``)."""
        from .released import released_pipeline_components

        return cls._from_components(released_pipeline_components(name, **kwargs), name)

    @classmethod
    def _from_components(cls, components: dict[str, Any], name: str) -> Any:
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
        block_size: Optional[int] = None,
        **load_kwargs: Any,
    ) -> Any:
        """A pipeline around :meth:`DFMForMaskedGeneration.from_causal_lm` (Llama / Mistral / Qwen2 families): the
        converted model (bidirectional, or block diffusion with ``block_size=K``), the causal LM's tokenizer with the
        mask token added (or ``mask_token_id`` reused), the default scheduler and the shipped presets. ``load_kwargs``
        reach transformers (``gguf_file=``, ``revision=``, ``dtype=``). The result needs diffusion adaptation training
        (``dfm-hf train --init_from_causal_lm``) before it generates well.
        """
        from .released import causal_lm_pipeline_components

        components = causal_lm_pipeline_components(
            pretrained_model_name_or_path_or_model,
            mask_token=mask_token,
            mask_token_id=mask_token_id,
            tokenizer=tokenizer,
            block_size=block_size,
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
            with clean_model_for_saving(self):
                super().save_pretrained(tmp, **kwargs)
            save_presets(self.scheduler_presets, tmp)
            _move_tree(tmp, str(save_directory))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if push_to_hub:
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
        return push_pipeline_to_hub(self, repo_id, **kwargs)


def _download_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The download arguments of ``kwargs``; ``proxies`` is refused clearly (huggingface_hub >= 1.0 reads proxies
    from the ``HTTP_PROXY`` / ``HTTPS_PROXY`` environment variables and has no such argument)."""
    if kwargs.get("proxies") is not None:
        raise ValueError(
            "`proxies` is not supported by huggingface_hub >= 1.0: set the HTTP_PROXY / HTTPS_PROXY environment "
            "variables instead."
        )
    return {k: kwargs[k] for k in DOWNLOAD_KWARGS if k in kwargs and k != "proxies"}


def _pipeline_quantization(quantization_config: Any) -> Any:
    """diffusers' ``PipelineQuantizationConfig`` for a saved pipeline: one given passes as it is; a transformers
    config (checked by :func:`~dfm_hf.models.loading.check_quantization_config`) applies to the model."""
    from diffusers import PipelineQuantizationConfig

    if isinstance(quantization_config, PipelineQuantizationConfig):
        return quantization_config
    return PipelineQuantizationConfig(quant_mapping={"model": check_quantization_config(quantization_config)})


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
    except LocalEntryNotFoundError:  # first: huggingface_hub derives it from EntryNotFoundError
        try:  # offline: a cached bare model has its config.json in the cache
            hf_hub_download(repo_id, "config.json", **{**hub, "local_files_only": True})
            return False
        except Exception:
            return True
    except EntryNotFoundError:
        return False
    except Exception:
        return True


def _check_components_present(folder: str, name: str) -> None:
    """Raise ``OSError`` naming the folder or file when a component ``model_index.json`` lists is missing."""
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
            if not present.intersection(TOKENIZER_VOCAB_FILES):
                raise OSError(
                    f"DFM pipeline {name!r}: the tokenizer folder {sub} has no vocabulary file (one of "
                    f"{list(TOKENIZER_VOCAB_FILES)})."
                )
            continue
        for f in files:
            if not os.path.isfile(os.path.join(sub, f)):
                raise OSError(f"DFM pipeline {name!r}: {os.path.join(sub, f)} is missing.")


def _check_no_pickle(folder: str, allow_pickle: bool) -> None:
    """Raise ``ValueError`` for a pickle file with no safetensors weights beside it, unless ``allow_pickle``."""
    if allow_pickle:
        return
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(PICKLE_SUFFIXES) and not any(g.endswith(".safetensors") for g in files):
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
