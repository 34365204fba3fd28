"""Pipeline components straight from a released diffusion LM (LLaDA, Dream, DiffuCoder) or a causal LM.

``DFMPipeline.from_pretrained`` calls :func:`released_pipeline_components` when a folder or repo has no
``model_index.json``, and ``DFMPipeline.from_causal_lm`` calls :func:`causal_lm_pipeline_components`. Both return
``{"model", "tokenizer", "scheduler", "scheduler_presets"}``: ``pipe = DFMPipeline(model=..., scheduler=...,
tokenizer=...)``, then the family presets are added to ``pipe.scheduler_presets``.

Downloads go through :func:`dfm_hf.hub.download_snapshot` with allow-patterns (configs, safetensors, tokenizer files,
chat templates: never code, never pickles), revisions and the offline cache. No remote code runs: the tokenizer is
loaded with ``trust_remote_code=False`` (a repo whose ``tokenizer_config.json`` names its own tokenizer class, like
Dream's ``DreamTokenizer``, falls back to the standard class its files describe).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from ..conversion import (
    MODEL_ALLOW_PATTERNS,
    TOKENIZER_ALLOW_PATTERNS,
    convert_causal_lm,
    detect_family,
    load_causal_lm,
    load_causal_lm_tokenizer,
    load_released_model,
    new_mask_token_id,
    pop_model_quantization,
    quantize_model,
    read_config_dict,
    resolve_folder,
)
from ..models.loading import ACCEPTED_QUANTIZATION, check_quantization_config
from ..schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler

#: Files a released-model download fetches.
RELEASED_ALLOW_PATTERNS = MODEL_ALLOW_PATTERNS + [p for p in TOKENIZER_ALLOW_PATTERNS if p not in MODEL_ALLOW_PATTERNS]

_DREAM_SAMPLING = dict(temperature=0.2, top_p=0.95)
#: Dream's confidence samplers exactly: its commit schedule on linspace(1, eps, N + 1) and its ranking on the
#: distribution after temperature and top-p (``alg_temp`` stays None, Dream's default).
_DREAM_RANKING = dict(transfer_schedule="dream", transfer_eps=1e-3, rank_on_processed=True, **_DREAM_SAMPLING)
#: family -> preset name -> (scheduler class, config overrides, what it reproduces). The first one is the default.
RELEASED_PRESET_SPECS: dict[str, dict[str, tuple[type, dict[str, Any], str]]] = {
    "llada": {
        "llada-blocks-32": (
            ConfidenceUnmaskingScheduler,
            dict(remasking="low_confidence", temperature=0.0, block_length=32),
            "LLaDA's generate() defaults: greedy, low-confidence remasking, semi-autoregressive blocks of 32.",
        ),
        "llada-low-confidence": (
            ConfidenceUnmaskingScheduler,
            dict(remasking="low_confidence", temperature=0.0),
            "LLaDA's low-confidence remasking over the whole span at once (block_length = gen_length).",
        ),
        "llada-random": (
            ConfidenceUnmaskingScheduler,
            dict(remasking="random", temperature=0.0, block_length=32),
            "LLaDA's random remasking in blocks of 32.",
        ),
    },
    "dream": {
        "dream-entropy": (
            ConfidenceUnmaskingScheduler,
            dict(confidence="entropy", **_DREAM_RANKING),
            "Dream's README default: alg='entropy', temperature 0.2, top_p 0.95 (Dream's schedule and ranking).",
        ),
        "dream-margin": (
            ConfidenceUnmaskingScheduler,
            dict(confidence="margin", **_DREAM_RANKING),
            "Dream's alg='topk_margin' (top-1 minus top-2 probability), temperature 0.2, top_p 0.95.",
        ),
        "dream-maskgit-plus": (
            ConfidenceUnmaskingScheduler,
            dict(confidence="probability", **_DREAM_RANKING),
            "Dream's alg='maskgit_plus' (top probability), temperature 0.2, top_p 0.95.",
        ),
        "dream-origin": (
            DiscreteFlowScheduler,
            dict(kappa_schedule="polynomial", kappa_exponent=1.0, corrector_alpha=0.0, **_DREAM_SAMPLING),
            "Dream's alg='origin' with eps = 0: each masked token revealed with probability (t - s) / t, i.e. the "
            "DFM Euler sampler with a linear kappa; temperature 0.2, top_p 0.95.",
        ),
    },
    "sdar": {
        "sdar-greedy": (
            ConfidenceUnmaskingScheduler,
            dict(remasking="low_confidence", temperature=0.0),
            "SDAR's greedy evaluation sampler (paper '(G)', static): blocks of the model's block_size, k = block / "
            "steps positions a step by confidence (the arg-max's probability); pass num_inference_steps = steps per "
            "block (SDAR: block_size) times the blocks generated.",
        ),
        "sdar-dynamic": (
            ConfidenceUnmaskingScheduler,
            dict(remasking="low_confidence", temperature=0.0, confidence_threshold=0.95),
            "SDAR's dynamic decoding, threshold 0.95: every masked position above it if at least k are, else the "
            "top k (the same steps as sdar-greedy, fewer model calls).",
        ),
        "sdar-sampling": (
            ConfidenceUnmaskingScheduler,
            dict(remasking="low_confidence", temperature=1.0),
            "SDAR's sampling decoding (paper '(S)'): tokens drawn at temperature 1 (no top-k / top-p), ranked by "
            "their probability.",
        ),
    },
    "fast_dllm_v2": {
        "fast-dllm-v2": (
            ConfidenceUnmaskingScheduler,
            dict(
                remasking="low_confidence",
                temperature=0.0,
                confidence_threshold=0.9,
                threshold_rule="top1",
                sub_block_length=8,
                autoregressive_first_token=True,
            ),
            "Fast-dLLM v2's sampler as its chatbot and evaluation run it: blocks of bd_size (32), the first token "
            "of a block decoded autoregressively, then sub-blocks of 8 left to right, each step committing the "
            "most confident position plus every one above 0.9; num_inference_steps is not binding.",
        ),
        "fast-dllm-v2-threshold-0.95": (
            ConfidenceUnmaskingScheduler,
            dict(
                remasking="low_confidence",
                temperature=0.0,
                confidence_threshold=0.95,
                threshold_rule="top1",
                sub_block_length=8,
                autoregressive_first_token=True,
            ),
            "The same with its batch sampler's default threshold, 0.95.",
        ),
    },
    "llada2": {
        "llada2-threshold-0.95": (
            ConfidenceUnmaskingScheduler,
            dict(remasking="low_confidence", temperature=0.0, confidence_threshold=0.95),
            "LLaDA2.0's generate() defaults: greedy, blocks of 32, 32 steps a block (pass num_inference_steps = 32 "
            "times the blocks generated), each step committing every masked position above 0.95 if at least k are, "
            "else the top k.",
        ),
        "llada2-threshold-0.7": (
            ConfidenceUnmaskingScheduler,
            dict(remasking="low_confidence", temperature=0.0, confidence_threshold=0.7),
            "The same at LLaDA2.1's threshold, 0.7, without token editing.",
        ),
        "llada21-editing": (
            ConfidenceUnmaskingScheduler,
            dict(
                remasking="low_confidence",
                temperature=0.0,
                confidence_threshold=0.7,
                editing_threshold=0.5,
                max_post_steps=16,
            ),
            "LLaDA2.1's sampler (quality mode): threshold 0.7 plus token editing, committed tokens of the open block "
            "replaced where a different arg-max has probability above 0.5, with up to 16 editing passes once its "
            "masks are gone.",
        ),
    },
    "bd3lm": {
        "bd3lm-first-hitting": (
            ConfidenceUnmaskingScheduler,
            dict(remasking="random", temperature=1.0, top_p=0.9),
            "BD3-LM's sampler as its generation scripts run it (first_hitting, nucleus_p 0.9, KV cache), with "
            "num_inference_steps = block_size x blocks: each step reveals one uniformly chosen masked position of "
            "the open block, drawn at temperature 1 from the top-p 0.9 nucleus. Its own loop also stops on its "
            "entropy / EOS checks, which this does not.",
        ),
        "bd3lm-ddpm": (
            DiscreteFlowScheduler,
            dict(kappa_schedule="polynomial", kappa_exponent=1.0, corrector_alpha=0.0, top_p=0.9),
            "BD3-LM's first_hitting=False update: each masked position revealed with probability (t - s) / t, "
            "the DFM Euler sampler with a linear kappa, block by block; top-p 0.9.",
        ),
    },
    "mdlm": {
        "mdlm-ddpm": (
            DiscreteFlowScheduler,
            dict(kappa_schedule="polynomial", kappa_exponent=1.0, corrector_alpha=0.0),
            "MDLM's ddpm_cache sampler: each masked position revealed with probability (t - s) / t at temperature "
            "1, the DFM Euler sampler with a linear kappa.",
        ),
    },
}
#: Where a BD3-LM / MDLM tokenizer comes from when the checkpoint has none (their code uses GPT-2's).
DIT_TOKENIZER_REPO = "openai-community/gpt2"


def family_scheduler_presets(family: str, mask_token_id: int, vocab_size: Optional[int]) -> dict[str, Any]:
    """The presets of ``family`` (``"llada"`` or ``"dream"``) for a model's mask id and vocabulary, in order (the
    first is the family default)."""
    if family not in RELEASED_PRESET_SPECS:
        raise ValueError(f"`family` must be one of {sorted(RELEASED_PRESET_SPECS)}, got {family!r}.")
    base = {"mask_token_id": mask_token_id, "vocab_size": vocab_size}
    return {name: cls(**base, **overrides) for name, (cls, overrides, _) in RELEASED_PRESET_SPECS[family].items()}


def load_tokenizer(folder: str, family: Optional[str] = None) -> Any:
    """``AutoTokenizer`` of ``folder`` without remote code; when its config names a custom class, the standard one
    its files describe (``tokenizer.json`` -> ``PreTrainedTokenizerFast``; ``vocab.json`` + ``merges.txt`` ->
    ``Qwen2Tokenizer`` for Dream). ``OSError`` naming the folder when nothing loads."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:
        first = err
    attempts = []
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        attempts.append(PreTrainedTokenizerFast)
    if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        from transformers import Qwen2Tokenizer

        attempts.append(Qwen2Tokenizer)
    for tokenizer_class in attempts:
        try:
            return tokenizer_class.from_pretrained(folder)
        except Exception:  # try the next standard class
            continue
    raise OSError(
        f"Could not load a tokenizer from {folder} ({first}); expected tokenizer.json, or vocab.json + merges.txt, "
        "with tokenizer_config.json (no remote code is run)."
    ) from first


def set_mask_token(tokenizer: Any, mask_token_id: int, where: str) -> Any:
    """Make ``tokenizer.mask_token_id == mask_token_id`` by marking the token already at that id as the mask token
    (e.g. LLaDA's ``<|mdm_mask|>`` at 126336, which its tokenizer does not declare). ``ValueError`` when the id is not
    a token of the tokenizer."""
    if tokenizer.mask_token_id == mask_token_id:
        return tokenizer
    token = tokenizer.convert_ids_to_tokens(mask_token_id) if 0 <= mask_token_id < len(tokenizer) else None
    if not token:
        raise ValueError(
            f"{where}: the model's mask id {mask_token_id} is not a token of its tokenizer ({len(tokenizer)} "
            "tokens), so prompts cannot hold the mask token; fix `mask_token_id` in config.json or the tokenizer."
        )
    tokenizer.add_special_tokens({"mask_token": token})
    if tokenizer.mask_token_id != mask_token_id:
        raise ValueError(
            f"{where}: the tokenizer maps its mask token {token!r} to {tokenizer.mask_token_id}, not {mask_token_id}."
        )
    return tokenizer


def _check_released_quantization(quantization_config: Any, name: str) -> Any:
    """``quantization_config`` checked for a model converted on load (:func:`check_quantization_config`); diffusers'
    ``PipelineQuantizationConfig`` is refused (there is no saved pipeline to map: pass the transformers config)."""
    from diffusers import PipelineQuantizationConfig

    if isinstance(quantization_config, PipelineQuantizationConfig):
        raise ValueError(
            f"`quantization_config` for {name!r} (converted on load) must be the model's own: "
            f"{ACCEPTED_QUANTIZATION}; a diffusers PipelineQuantizationConfig applies to saved pipelines only."
        )
    return check_quantization_config(quantization_config)


def dit_tokenizer(folder: str, mask_token_id: int, **hub_kwargs: Any) -> Any:
    """A BD3-LM / MDLM tokenizer: the folder's, else GPT-2's (:data:`DIT_TOKENIZER_REPO`, what their code uses),
    with ``[MASK]`` added when the mask id is the first id past it (their mask token is the vocabulary's last id)."""
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        folder = resolve_folder(DIT_TOKENIZER_REPO, TOKENIZER_ALLOW_PATTERNS, "tokenizer", **hub_kwargs)
    tokenizer = load_tokenizer(folder)
    if mask_token_id == len(tokenizer):
        tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    return tokenizer


def released_pipeline_components(
    path_or_repo_id: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    subfolder: Optional[str] = None,
    dtype: Any = None,
    torch_dtype: Any = None,
    device_map: Any = None,
    max_memory: Any = None,
    attn_implementation: Optional[str] = None,
    allow_pickle: bool = False,
    quantization_config: Any = None,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """``{"model", "tokenizer", "scheduler", "scheduler_presets"}`` for a LLaDA / Dream / DiffuCoder folder or repo.

    - ``model``: the checkpoint converted on load (:func:`dfm_hf.conversion.load_released_model`: strict,
      ``dtype`` / ``device_map`` honoured; default dtype: the checkpoint's; ``quantization_config``, a transformers
      ``TorchAoConfig`` or ``BitsAndBytesConfig``, quantizes its linear weights as they are read).
    - ``tokenizer``: the repo's ``AutoTokenizer`` (no remote code), its mask token set to the model's mask id where it
      lacks it.
    - ``scheduler``: the family default (LLaDA: greedy low-confidence unmasking in blocks of 32; Dream: entropy
      confidence, temperature 0.2, top_p 0.95); ``scheduler_presets``: every preset of :data:`RELEASED_PRESET_SPECS`
      for that family.

    ``allow_pickle`` is accepted for symmetry with ``DFMPipeline.from_pretrained`` and has no effect: released
    checkpoints are read from safetensors only. Other ``model_kwargs`` go to ``load_released_model`` (which ignores
    the loader options that do not apply to a conversion and refuses unknown ones with ``TypeError``).

    Errors: ``ValueError`` for a model type or configuration we do not convert and for checkpoints that do not match
    their config; ``OSError`` for missing or broken files.
    """
    del allow_pickle
    name = str(path_or_repo_id)
    quantization_config = _check_released_quantization(quantization_config, name)
    folder = resolve_folder(
        name,
        RELEASED_ALLOW_PATTERNS,
        "released model",
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
        subfolder=subfolder or "",
    )
    family = detect_family(read_config_dict(folder))
    from ..models import DFMForMaskedGeneration

    model = load_released_model(
        DFMForMaskedGeneration,
        folder,
        dtype=dtype if dtype is not None else torch_dtype,
        device_map=device_map,
        max_memory=max_memory,
        attn_implementation=attn_implementation,
        quantization_config=quantization_config,
        **model_kwargs,
    )
    model.config._name_or_path = name
    mask_token_id, tokenizer = model.config.mask_token_id, None
    if family in ("bd3lm", "mdlm"):
        hub = dict(cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        tokenizer = dit_tokenizer(folder, mask_token_id, **hub)
    tokenizer = set_mask_token(tokenizer or load_tokenizer(folder, family), mask_token_id, f"{family} model {name!r}")
    presets = family_scheduler_presets(family, mask_token_id, model.config.vocab_size)
    default = next(iter(presets.values()))
    scheduler = type(default).from_config(default.config)
    return {"model": model, "tokenizer": tokenizer, "scheduler": scheduler, "scheduler_presets": presets}


def causal_lm_pipeline_components(
    pretrained_model_name_or_path_or_model: Any,
    mask_token: str = "<|mask|>",
    mask_token_id: Optional[int] = None,
    tokenizer: Any = None,
    block_size: Optional[int] = None,
    **load_kwargs: Any,
) -> dict[str, Any]:
    """``{"model", "tokenizer", "scheduler", "scheduler_presets"}`` for a Llama / Mistral / Qwen2 causal LM.

    The model is :meth:`DFMForMaskedGeneration.from_causal_lm`'s conversion (``block_size=K``: block diffusion);
    the tokenizer (loaded from the same
    folder or repo unless given; required for a model instance) gets the mask token: ``mask_token_id`` given ->
    the token at that id becomes the mask token (its embedding row is kept); otherwise ``mask_token`` is added as a
    special token with id ``len(tokenizer)``, whose embedding row (and head row when untied) is the mean of the real
    tokens' rows (the table grows by one row only when that id is past its end). ``load_kwargs`` reach
    ``AutoModelForCausalLM.from_pretrained`` (``gguf_file=``, ``revision=``, ``dtype=``...; downloads fetch configs,
    safetensors, tokenizer files and the named GGUF only). The scheduler is the library default
    (:class:`~dfm_hf.DiscreteFlowScheduler`, linear kappa); ``scheduler_presets`` is empty (the pipeline adds the
    shipped ones). The converted model is a starting point: it needs diffusion adaptation training before it
    generates well.
    """
    from transformers import PreTrainedModel

    from ..models import DFMForMaskedGeneration
    from ..models.configuration_dfm import check_block_size

    check_block_size(block_size)
    source = pretrained_model_name_or_path_or_model
    quantization = load_kwargs.get("quantization_config")
    if quantization is not None:
        load_kwargs["quantization_config"] = check_quantization_config(quantization, gguf_source=True)
    quantization = pop_model_quantization(load_kwargs)
    if isinstance(source, PreTrainedModel):
        if load_kwargs:
            raise TypeError(f"load keyword arguments {sorted(load_kwargs)} need a path or repo id, not a model.")
        if tokenizer is None:
            raise ValueError("`tokenizer` is required when converting a loaded causal LM (it gets the mask token).")
        source_model = source
    elif isinstance(source, (str, os.PathLike)):
        if tokenizer is None:
            tokenizer = load_causal_lm_tokenizer(source, load_kwargs)
        source_model = None
    else:
        raise ValueError(
            "`pretrained_model_name_or_path_or_model` must be a path, a Hub repo id or a loaded transformers causal "
            f"LM, got {type(source).__name__}."
        )
    if mask_token_id is None:
        new_id = new_mask_token_id(tokenizer, mask_token)  # checked before any weight is read
    else:
        new_id = None
    if source_model is None:
        source_model = load_causal_lm(source, load_kwargs)
    model = convert_causal_lm(
        DFMForMaskedGeneration, source_model, mask_token_id=mask_token_id, real_vocab_size=new_id, block_size=block_size
    )
    where = f"causal LM {str(getattr(source_model.config, '_name_or_path', '') or type(source_model).__name__)!r}"
    if quantization is not None:
        del source_model, source  # the converted model holds the weights alone: quantizing frees them as it goes
        model = quantize_model(model, quantization)
    if new_id is not None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
        if tokenizer.mask_token_id != new_id:
            raise ValueError(
                f"{where}: the tokenizer gave the new mask token id {tokenizer.mask_token_id}, not {new_id}."
            )
    else:
        set_mask_token(tokenizer, mask_token_id, where)
    scheduler = DiscreteFlowScheduler(mask_token_id=model.config.mask_token_id, vocab_size=model.config.vocab_size)
    return {"model": model, "tokenizer": tokenizer, "scheduler": scheduler, "scheduler_presets": {}}


__all__ = [
    "DIT_TOKENIZER_REPO",
    "RELEASED_ALLOW_PATTERNS",
    "RELEASED_PRESET_SPECS",
    "causal_lm_pipeline_components",
    "dit_tokenizer",
    "family_scheduler_presets",
    "load_tokenizer",
    "released_pipeline_components",
    "set_mask_token",
]
