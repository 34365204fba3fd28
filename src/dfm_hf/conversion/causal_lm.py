"""Causal LMs of the Llama, Mistral and Qwen2 families (SmolLM2, TinyLlama, Qwen2.5...) as the starting point of a
diffusion adaptation: ``logits_shift=True`` (the output at ``i - 1`` predicts token ``i``, as the causal LM was
trained), bidirectional attention or block-causal attention (``block_size=K``: block diffusion), a mask token added
or reused. What ``DFMForMaskedGeneration.from_causal_lm`` runs (:func:`causal_lm_to_dfm`).

The causal LM is loaded by transformers' own classes (never remote code; safetensors or a dequantized GGUF) and its
tensors are moved into the converted model strictly: every tensor used, every parameter filled, shapes checked.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

from ..models.configuration_dfm import DFMConfig, check_block_size
from .checkpoint import HUB_KWARGS, MODEL_ALLOW_PATTERNS, resolve_folder
from .families import (
    CAUSAL_LM_MODEL_TYPES,
    IGNORED_TENSOR_PATTERN,
    _check_values,
    _format_names,
    _refuse,
    _rope_settings,
)
from .loader import build_empty_model, finish_model, model_tensors, quantize_model, set_tensor
from .quantization import pop_model_quantization

#: Tokenizer files fetched with a model (never code): vocabularies, merges, sentencepiece models, chat templates.
TOKENIZER_ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def causal_lm_config_to_dfm(
    config: Any, vocab_size: int, mask_token_id: int, block_size: Optional[int] = None
) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for a Llama / Mistral / Qwen2 transformers config (``logits_shift=True``;
    ``block_size``: None for bidirectional attention, ``K`` for block diffusion, ``1`` being the causal LM itself).

    An active sliding window (Mistral, Qwen2 ``use_sliding_window``) caps ``max_position_embeddings`` at the window:
    within it, windowed attention is full attention, so the conversion stays exact. ``rope_parameters`` are copied
    (every rope type of transformers: default, linear, dynamic, yarn, llama3, longrope; see ``_rope_settings``), so
    Llama 3.x and rope-scaled Qwen2 convert exactly. Refused: other model types, partial rotary embeddings,
    activations other than SiLU, biases other than Qwen2's q/k/v ones.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in CAUSAL_LM_MODEL_TYPES:
        raise ValueError(
            f"`model_type` {model_type!r} is not a causal LM family we convert; accepted: "
            f"{list(CAUSAL_LM_MODEL_TYPES)} (Llama, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen2.5, Qwen2.5-Coder)."
        )
    family = f"{model_type} causal LM"
    values = config.to_dict()
    _check_values(values, family, {"hidden_act": ("silu",), "mlp_bias": (False,), "pretraining_tp": (1,)})
    if model_type == "llama" and values.get("attention_bias"):
        raise _refuse(family, "attention_bias", True, "False (Llama puts a bias on o_proj too, which we do not have)")
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope_parameters, max_positions = _rope_settings(values, family, int(config.max_position_embeddings))
    window = getattr(config, "sliding_window", None)
    windowed = model_type == "mistral" or (
        model_type == "qwen2" and "sliding_attention" in (getattr(config, "layer_types", None) or [])
    )
    if windowed and window is not None and window < max_positions:
        max_positions = int(window)
    ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return dict(
        vocab_size=int(vocab_size),
        hidden_size=int(config.hidden_size),
        num_hidden_layers=int(config.num_hidden_layers),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=None if head_dim * heads == config.hidden_size else int(head_dim),
        intermediate_size=int(config.intermediate_size),
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters,
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        logits_shift=True,
        block_size=check_block_size(block_size),
        mask_token_id=int(mask_token_id),
        **ids,
    )


def causal_lm_folder(source: Union[str, os.PathLike], load_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(folder, kwargs)``: a local folder as is, or a Hub repo downloaded through :func:`resolve_folder` (configs,
    safetensors, tokenizer files and the named ``gguf_file`` only: never code or pickles), with the Hub arguments
    (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``subfolder``) consumed."""
    kwargs = dict(load_kwargs)
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    gguf_file = kwargs.get("gguf_file")
    patterns = MODEL_ALLOW_PATTERNS + [p for p in TOKENIZER_ALLOW_PATTERNS if p not in MODEL_ALLOW_PATTERNS]
    if gguf_file:
        patterns.append(str(gguf_file))
    folder = resolve_folder(source, patterns, "causal LM", **{k: v for k, v in hub.items() if v is not None})
    return folder, kwargs


def load_causal_lm(source: Union[str, os.PathLike], load_kwargs: dict[str, Any]) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` of a Llama / Mistral / Qwen2 folder or repo, after checking the
    architecture from its config. Only safetensors (or the named GGUF file, dequantized: we need plain weights) are
    read; ``trust_remote_code`` is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

    if load_kwargs.get("trust_remote_code"):
        raise ValueError("`trust_remote_code=True`: only the built-in Llama / Mistral / Qwen2 classes are converted.")
    folder, kwargs = causal_lm_folder(source, load_kwargs)
    if kwargs.get("gguf_file"):
        if kwargs.get("quantization_config") is None:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    elif kwargs.get("use_safetensors") is False:
        raise ValueError("`use_safetensors=False`: causal LMs are read from safetensors (or GGUF) only.")
    else:
        kwargs["use_safetensors"] = True
    config = AutoConfig.from_pretrained(
        folder, **({"gguf_file": kwargs["gguf_file"]} if kwargs.get("gguf_file") else {})
    )
    causal_lm_config_to_dfm(config, 1, 0)  # refuse unsupported architectures before reading the weights
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config._name_or_path = str(source)
    return model


def load_causal_lm_tokenizer(source: Union[str, os.PathLike], load_kwargs: dict[str, Any]) -> Any:
    """The tokenizer stored with a causal LM folder or repo (``AutoTokenizer``, no remote code; with ``gguf_file``
    the GGUF's own tokenizer). Raises ``OSError`` naming the source when there is none."""
    from transformers import AutoTokenizer

    folder, kwargs = causal_lm_folder(source, load_kwargs)
    extra = {"gguf_file": kwargs["gguf_file"]} if kwargs.get("gguf_file") else {}
    try:
        return AutoTokenizer.from_pretrained(folder, **extra)
    except Exception as err:
        raise OSError(f"Could not load the tokenizer of {str(source)!r} ({err}); pass one as `tokenizer=`.") from err


def new_mask_token_id(tokenizer: Any, mask_token: str) -> int:
    """The id a new ``mask_token`` gets when added to ``tokenizer``: ``len(tokenizer)``. Refuses a string that is
    already a token (its row may be trained: reuse it explicitly with ``mask_token_id=`` instead)."""
    if not isinstance(mask_token, str) or not mask_token:
        raise ValueError(f"`mask_token` must be a non-empty string, got {mask_token!r}.")
    if mask_token in tokenizer.get_vocab():
        raise ValueError(
            f"`mask_token` {mask_token!r} is already token {tokenizer.convert_tokens_to_ids(mask_token)} of the "
            "tokenizer: pass `mask_token_id=` to reuse it, or choose another `mask_token`."
        )
    return len(tokenizer)


def _mean_row(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The mean of the first ``rows`` rows of ``weight`` (computed in float32, returned in its dtype)."""
    return weight[:rows].float().mean(0).to(weight.dtype)


def convert_causal_lm(
    cls: type,
    source_model: Any,
    mask_token_id: Optional[int] = None,
    real_vocab_size: Optional[int] = None,
    block_size: Optional[int] = None,
) -> Any:
    """A ``cls`` model holding the weights of a loaded Llama / Mistral / Qwen2 causal LM (its tensors are shared, not
    copied, except the embedding and head when a row is added).

    ``mask_token_id`` given: that existing id is the mask token (its row is kept). None: a new mask id
    ``real_vocab_size`` (``len(tokenizer)``; default: the number of embedding rows) whose embedding row (and head row
    when untied) is the mean of the rows of the ``real_vocab_size`` real tokens; the table grows by one row only when
    that id is past its end (tokenizers smaller than their table, e.g. Qwen2's, reuse an unused padding row).
    ``block_size``: see :func:`causal_lm_config_to_dfm`.
    """
    from transformers import PreTrainedModel

    if not isinstance(source_model, PreTrainedModel):
        raise ValueError(f"expected a transformers causal LM, got {type(source_model).__name__}.")
    source_config = source_model.config
    embed = source_model.get_input_embeddings().weight
    head = source_model.get_output_embeddings()
    rows = int(embed.shape[0])
    tied = bool(getattr(source_config, "tie_word_embeddings", False))
    if mask_token_id is not None:
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < rows:
            raise ValueError(f"`mask_token_id` must be an existing id in [0, {rows}), got {mask_token_id!r}.")
        new_id, vocab = None, rows
    else:
        real = rows if real_vocab_size is None else int(real_vocab_size)
        if not 0 < real <= rows:
            raise ValueError(f"the tokenizer has {real} tokens, more than the {rows} embedding rows of the model.")
        new_id, vocab = real, max(rows, real + 1)
        mask_token_id = new_id
    config = DFMConfig(**causal_lm_config_to_dfm(source_config, vocab, mask_token_id, block_size))
    dtype = embed.dtype if embed.dtype.is_floating_point else torch.float32
    model = build_empty_model(cls, config, dtype, None)
    state = {k: v for k, v in source_model.state_dict().items() if not IGNORED_TENSOR_PATTERN.search(k)}
    packed = sorted(k for k, v in state.items() if not v.is_floating_point())
    if packed:
        raise ValueError(
            f"the causal LM holds quantized (non-float) tensors ({_format_names(packed, 4)}): load it dequantized "
            "(for a GGUF file: `quantization_config=GgufConfig(dequantize=True)`, the default here)."
        )
    if tied:
        state.pop("lm_head.weight", None)
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the {source_config.model_type} causal LM does not match its converted DFM model (missing: "
            f"{_format_names(missing) or '-'}; unexpected: {_format_names(unexpected) or '-'})."
        )
    for name, tensor in state.items():
        tensor = tensor.detach()
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            if new_id is not None:
                grown = tensor.new_empty((vocab, tensor.shape[1]))
                grown[:rows] = tensor
                grown[new_id] = _mean_row(tensor, new_id)
                tensor = grown
        elif tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(expected[name])}.")
        set_tensor(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    if head is not None and not tied and "lm_head.weight" not in state:
        raise ValueError("the causal LM has an untied head without weights.")
    return finish_model(model, str(getattr(source_config, "_name_or_path", "") or "causal LM"))


def causal_lm_to_dfm(
    cls: type,
    pretrained_model_name_or_path_or_model: Any,
    mask_token: str = "<|mask|>",
    mask_token_id: Optional[int] = None,
    block_size: Optional[int] = None,
    **load_kwargs: Any,
) -> Any:
    """What ``DFMForMaskedGeneration.from_causal_lm`` runs: load (or take) a causal LM and convert it (bidirectional,
    or block diffusion with ``block_size=K``).

    A path or repo id is loaded with ``AutoModelForCausalLM.from_pretrained(..., **load_kwargs)`` (``gguf_file=``,
    ``revision=``, ``dtype=``... reach transformers; a GGUF is dequantized). Without ``mask_token_id`` the new mask
    id is ``len(tokenizer)`` of the tokenizer stored with the model (the number of embedding rows for a model instance
    or when there is none), so that ``tokenizer.add_special_tokens({"mask_token": mask_token})`` gives exactly that
    id; if ``mask_token`` is already a token of that tokenizer, pass its id as ``mask_token_id`` (or choose another
    string): we never overwrite a trained row silently. ``quantization_config`` (a ``TorchAoConfig`` or
    ``BitsAndBytesConfig``; a ``GgufConfig`` reads a GGUF source) quantizes the converted model
    (:func:`~dfm_hf.conversion.loader.quantize_model`).
    """
    from transformers import PreTrainedModel

    check_block_size(block_size)
    quantization_config = pop_model_quantization(load_kwargs)
    real_vocab = None
    if isinstance(pretrained_model_name_or_path_or_model, PreTrainedModel):
        if load_kwargs:
            raise TypeError(f"load keyword arguments {sorted(load_kwargs)} need a path or repo id, not a model.")
        source_model = pretrained_model_name_or_path_or_model
        causal_lm_config_to_dfm(source_model.config, 1, 0)
    elif isinstance(pretrained_model_name_or_path_or_model, (str, os.PathLike)):
        source = pretrained_model_name_or_path_or_model
        source_model = load_causal_lm(source, load_kwargs)
        if mask_token_id is None:
            try:
                tokenizer = load_causal_lm_tokenizer(source, load_kwargs)
            except OSError:  # no tokenizer with the model: the new row goes after the table's last one
                tokenizer = None
            real_vocab = new_mask_token_id(tokenizer, mask_token) if tokenizer is not None else None
    else:
        raise ValueError(
            "`pretrained_model_name_or_path_or_model` must be a path, a Hub repo id or a loaded transformers causal "
            f"LM, got {type(pretrained_model_name_or_path_or_model).__name__}."
        )
    model = convert_causal_lm(
        cls, source_model, mask_token_id=mask_token_id, real_vocab_size=real_vocab, block_size=block_size
    )
    del source_model  # the converted model holds the weights alone: quantizing frees them as it goes
    return model if quantization_config is None else quantize_model(model, quantization_config)
