"""Converting foreign checkpoints into :class:`~dfm_hf.DFMForMaskedGeneration`, natively (never remote code).

Two sources:

- **Released masked-diffusion LMs** (:func:`load_released_model`, what ``DFMForMaskedGeneration.from_pretrained``
  runs when ``config.json`` is not ours): LLaDA (``model_type: "llada"``; Llama-like blocks with OLMo-style tensor
  names, bidirectional, position ``i`` predicts token ``i``) and Dream / DiffuCoder (``model_type: "Dream"``; Qwen2
  tensor names, bidirectional, **shifted** logits: the output at ``i - 1`` predicts token ``i``). Config and weights
  are converted on load; ``save_pretrained`` then writes our own format.
- **Causal LMs** of the Llama, Mistral and Qwen2 families (:func:`causal_lm_to_dfm`, what
  ``DFMForMaskedGeneration.from_causal_lm`` runs): the starting point of a diffusion adaptation (``logits_shift=True``,
  bidirectional attention, a mask token added or reused).

Loading is strict: every tensor of the checkpoint is used and every parameter of the model is filled, with the same
shape, else a ``ValueError`` names the tensors (missing and unexpected); a configuration value we do not implement is
refused with a ``ValueError`` naming the key and the accepted values. Only safetensors are read. The model is built on
the meta device and each tensor is read straight from its file into its final place (shard by shard, tensor by
tensor, cast to ``dtype`` on the way): no second copy of the weights exists at any time.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .configuration_dfm import DFMConfig

#: ``config.json`` ``model_type`` -> family name, for the released masked-diffusion LMs we convert.
RELEASED_MODEL_TYPES: dict[str, str] = {"llada": "llada", "Dream": "dream"}
#: ``model_type`` values of the causal LMs :func:`causal_lm_to_dfm` converts.
CAUSAL_LM_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
#: Special ids of the released checkpoints, used when their ``config.json`` does not name them.
LLADA_MASK_TOKEN_ID = 126336
LLADA_EOS_TOKEN_ID = 126081
DREAM_MASK_TOKEN_ID = 151666
DREAM_PAD_TOKEN_ID = 151643
#: Files a model download fetches: configs and safetensors weights. Never code, never pickles.
MODEL_ALLOW_PATTERNS = ["*.json", "*.safetensors"]
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Checkpoint tensors that carry no learned values (rotary frequency tables some exporters save): skipped.
IGNORED_TENSOR_PATTERN = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# kwargs of `from_pretrained` that have no effect on a conversion (they steer transformers' own loader)
_IGNORED_LOAD_KWARGS = (
    "low_cpu_mem_usage",
    "offload_state_dict",
    "trust_remote_code",
    "_from_auto",
    "_from_pipeline",
    "_commit_hash",
    "use_safetensors",
    "variant",
    "disable_mmap",
    "weights_only",
    "offload_folder",
    "offload_buffers",
    "proxies",
    "ignore_mismatched_sizes",
)
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")

# LLaDA block submodule -> ours (LLaDA's `ff_proj` is the SiLU branch: `ff_out(act(ff_proj(x)) * up_proj(x))`)
_LLADA_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
_LLADA_TOP_NAMES = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_LLADA_BLOCK_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.([a-z_]+)\.weight$")
_LAYER_NAMES = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_QKV_BIAS_NAMES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def _refuse(family: str, key: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"{family} config: `{key}` = {value!r} is not supported; accepted: {accepted}.")


def _require(config: dict[str, Any], key: str, family: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"{family} config: `{key}` is missing (required to convert the checkpoint).")
    return config[key]


def _check_values(config: dict[str, Any], family: str, allowed: dict[str, tuple[Any, ...]]) -> None:
    """Refuse every key of ``allowed`` whose value (when present) is not one of the accepted ones."""
    for key, accepted in allowed.items():
        if key in config and config[key] not in accepted:
            raise _refuse(family, key, config[key], " or ".join(repr(a) for a in accepted))


def _rope_theta(config: dict[str, Any], family: str, default: float = 10000.0) -> float:
    """``rope_theta``, refusing any rope scaling (we implement plain rotary embeddings only)."""
    theta = config.get("rope_theta", default)
    scaling = config.get("rope_scaling")
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if rope_type != "default":
            raise _refuse(family, "rope_scaling", scaling, "None (plain rotary embeddings)")
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict):
        if parameters.get("rope_type", "default") != "default":
            raise _refuse(family, "rope_parameters.rope_type", parameters.get("rope_type"), "'default'")
        theta = parameters.get("rope_theta", theta)
    return float(theta)


def _special_ids(config: dict[str, Any], **defaults: Optional[int]) -> dict[str, Any]:
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        value = config.get(key)
        ids[key] = defaults.get(key) if value is None else value
    return ids


def detect_family(config: dict[str, Any]) -> str:
    """The released family of a ``config.json`` dict: ``"llada"`` or ``"dream"``; ``ValueError`` otherwise."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in RELEASED_MODEL_TYPES:
        raise ValueError(
            f"`model_type` {model_type!r} is not a released masked-diffusion LM we convert; accepted: "
            f"{sorted(RELEASED_MODEL_TYPES)} (LLaDA, Dream / DiffuCoder), or 'dfm' (our own checkpoints). Causal LMs "
            f"({', '.join(CAUSAL_LM_MODEL_TYPES)}) convert with `DFMForMaskedGeneration.from_causal_lm`."
        )
    return RELEASED_MODEL_TYPES[model_type]


def llada_config_to_dfm(config: dict[str, Any]) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for a LLaDA ``config.json`` dict (dense ``block_type: "llama"`` models only).

    ``vocab_size`` is LLaDA's ``embedding_size`` (the real number of embedding and head rows, which may exceed its
    ``vocab_size``); the FFN width is ``mlp_hidden_size`` (``mlp_ratio * d_model`` only when it is absent, as LLaDA
    does). Refused: MoE variants (LLaDA-MoE ships ``model_type: "llada"`` with MoE keys), other block types, biases,
    non-RMS or affine-free layer norms, q/k norms, activations other than SiLU, ALiBi or learned positions, rope
    scaling, input-embedding scaling, logit scaling, block groups, q/k/v clipping and embedding dropout.
    """
    family = "LLaDA"
    moe_keys = sorted(k for k in config if "expert" in k or k.startswith("moe") or k in ("num_experts", "router_aux"))
    if moe_keys or ("d_model" not in config and "hidden_size" in config):
        raise ValueError(
            f"{family} config: this is a mixture-of-experts checkpoint (LLaDA-MoE; keys "
            f"{moe_keys or ['hidden_size']}), which we do not implement; accepted: the dense LLaDA models "
            "(`d_model`, `block_type: 'llama'`)."
        )
    if config.get("block_type") != "llama":
        raise _refuse(family, "block_type", config.get("block_type"), "'llama'")
    _check_values(
        config,
        family,
        {
            "include_bias": (False,),
            "include_qkv_bias": (False, None),
            "bias_for_layer_norm": (False, None),
            "layer_norm_type": ("rms",),
            "layer_norm_with_affine": (True,),
            "attention_layer_norm": (False,),
            "activation_type": ("silu",),
            "alibi": (False,),
            "rope": (True,),
            "input_emb_norm": (False,),
            "scale_logits": (False,),
            "block_group_size": (1,),
            "clip_qkv": (None,),
            "embedding_dropout": (0, 0.0),
        },
    )
    for key in ("layer_norm_type", "activation_type", "rope"):
        if key not in config:  # LLaDA's own defaults differ for these: a config must state them
            _require(config, key, family)
    d_model = _require(config, "d_model", family)
    n_heads = _require(config, "n_heads", family)
    n_kv_heads = config.get("n_kv_heads")
    if n_kv_heads is None:
        n_kv_heads = 1 if config.get("multi_query_attention") else n_heads
    mlp_hidden = config.get("mlp_hidden_size")
    if mlp_hidden is None:
        mlp_hidden = _require(config, "mlp_ratio", family) * d_model
    vocab = _require(config, "vocab_size", family)
    rows = config.get("embedding_size") or vocab
    if rows < vocab:
        raise ValueError(f"{family} config: `embedding_size` ({rows}) must be at least `vocab_size` ({vocab}).")
    ids = _special_ids(config, eos_token_id=LLADA_EOS_TOKEN_ID if rows > LLADA_EOS_TOKEN_ID else None)
    if ids["mask_token_id"] is None:
        if rows <= LLADA_MASK_TOKEN_ID:
            raise ValueError(
                f"{family} config: `mask_token_id` is missing and the default {LLADA_MASK_TOKEN_ID} "
                f"does not fit the {rows} embedding rows; add `mask_token_id` to config.json."
            )
        ids["mask_token_id"] = LLADA_MASK_TOKEN_ID
    return dict(
        vocab_size=int(rows),
        hidden_size=int(d_model),
        num_hidden_layers=int(_require(config, "n_layers", family)),
        num_attention_heads=int(n_heads),
        num_key_value_heads=int(n_kv_heads),
        intermediate_size=int(mlp_hidden),
        max_position_embeddings=int(_require(config, "max_sequence_length", family)),
        rope_theta=_rope_theta(config, family),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        attention_dropout=float(config.get("attention_dropout", 0.0) or 0.0),
        hidden_dropout=float(config.get("residual_dropout", 0.0) or 0.0),
        attention_bias=False,
        logits_shift=False,
        **ids,
    )


def dream_config_to_dfm(config: dict[str, Any], has_qkv_bias: bool = True) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for a Dream / DiffuCoder ``config.json`` dict (Qwen2 keys).

    Dream's attention always has q/k/v biases whatever its config says (its ``attention_bias`` key is not read by its
    modeling code), so ``has_qkv_bias`` is decided from the checkpoint (does it hold ``q_proj.bias``?). The head width
    is ``hidden_size / num_attention_heads`` (Dream ignores ``head_dim``). Refused: an enabled sliding window, rope
    scaling, activations other than SiLU.
    """
    family = "Dream"
    _check_values(config, family, {"hidden_act": ("silu",), "use_sliding_window": (False, None), "use_mrope": (False,)})
    heads = int(_require(config, "num_attention_heads", family))
    kv_heads = config.get("num_key_value_heads")
    ids = _special_ids(config, mask_token_id=DREAM_MASK_TOKEN_ID, pad_token_id=DREAM_PAD_TOKEN_ID)
    return dict(
        vocab_size=int(_require(config, "vocab_size", family)),
        hidden_size=int(_require(config, "hidden_size", family)),
        num_hidden_layers=int(_require(config, "num_hidden_layers", family)),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads) if kv_heads is not None else heads,
        intermediate_size=int(_require(config, "intermediate_size", family)),
        max_position_embeddings=int(_require(config, "max_position_embeddings", family)),
        rope_theta=_rope_theta(config, family),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_dropout=float(config.get("attention_dropout", 0.0) or 0.0),
        attention_bias=bool(has_qkv_bias),
        logits_shift=True,
        **ids,
    )


def released_dfm_config(config: dict[str, Any], tensor_names: Collection[str] = ()) -> tuple[str, DFMConfig]:
    """``(family, DFMConfig)`` for a released checkpoint's ``config.json`` dict and the names of its tensors."""
    family = detect_family(config)
    if family == "llada":
        kwargs = llada_config_to_dfm(config)
    else:
        kwargs = dream_config_to_dfm(config, has_qkv_bias="model.layers.0.self_attn.q_proj.bias" in set(tensor_names))
    return family, DFMConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------------------------------


def llada_to_dfm_name(name: str) -> Optional[str]:
    """Our parameter name for a LLaDA tensor name, or None when it is not part of the format."""
    if name in _LLADA_TOP_NAMES:
        return _LLADA_TOP_NAMES[name]
    match = _LLADA_BLOCK_RE.match(name)
    if match and match.group(2) in _LLADA_BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_LLADA_BLOCK_NAMES[match.group(2)]}.weight"
    return None


def expected_tensor_names(family: str, config: DFMConfig) -> dict[str, str]:
    """Checkpoint tensor name -> our parameter name, for every tensor a checkpoint of ``family`` must hold."""
    layers = range(config.num_hidden_layers)
    if family == "llada":
        names = {"model.transformer.wte.weight": "", "model.transformer.ln_f.weight": ""}
        if not config.tie_word_embeddings:
            names["model.transformer.ff_out.weight"] = ""
        names.update({f"model.transformer.blocks.{i}.{b}.weight": "" for i in layers for b in _LLADA_BLOCK_NAMES})
        return {k: llada_to_dfm_name(k) for k in names}
    ours = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        ours.append("lm_head.weight")
    per_layer = _LAYER_NAMES + (_QKV_BIAS_NAMES if getattr(config, "attention_bias", False) else ())
    ours += [f"model.layers.{i}.{n}" for i in layers for n in per_layer]
    return {n: n for n in ours}


def _format_names(names: Collection[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------------------------
# Reading safetensors checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and byte range (relative to the file's data section)."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class CheckpointIndex:
    """Every tensor of a safetensors checkpoint (one file, or shards named by ``model.safetensors.index.json``)."""

    folder: str
    files: list[str]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    data_start: dict[str, int] = field(default_factory=dict)

    def floating_dtype(self) -> Optional[torch.dtype]:
        """The floating dtype holding most of the checkpoint's elements (None if it has no floating tensors)."""
        counts: Counter[torch.dtype] = Counter()
        for entry in self.tensors.values():
            if entry.dtype.is_floating_point:
                counts[entry.dtype] += math.prod(entry.shape)
        return counts.most_common(1)[0][0] if counts else None

    def nbytes(self) -> int:
        """Total size of the tensor data."""
        return sum(e.end - e.begin for e in self.tensors.values())


def _broken_file(path: str, folder: str, err: BaseException) -> OSError:
    return OSError(
        f"{os.path.basename(path)} in {folder} is not a valid safetensors file ({err}); it may be truncated or "
        "corrupted (an interrupted download or save): download or save it again."
    )


def _read_header(path: str, folder: str) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of a safetensors file, validated by ``safetensors`` itself first."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
    except Exception as err:  # SafetensorError (incomplete metadata, bad header...), OSError, JSON errors
        raise _broken_file(path, folder, err) from err
    return 8 + size, header


def read_checkpoint_index(folder: str) -> CheckpointIndex:
    """Index the safetensors weights of ``folder`` (``model.safetensors.index.json`` shards, or one file).

    Raises ``ValueError`` when the folder only holds pickled weights (refused: they can run code on load) and
    ``OSError`` naming the file when weights are missing, broken or disagree with the index.
    """
    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    single_path = os.path.join(folder, SAFE_WEIGHTS_NAME)
    weight_map: Optional[dict[str, str]] = None
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("`weight_map` must be a non-empty object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise OSError(f"{SAFE_WEIGHTS_INDEX_NAME} in {folder} is not a valid shard index ({err}).") from err
        files = sorted(set(weight_map.values()))
        for name in files:
            if not isinstance(name, str) or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
                raise OSError(f"{SAFE_WEIGHTS_INDEX_NAME} in {folder} names an invalid shard file {name!r}.")
            if not name.endswith(".safetensors"):
                raise ValueError(f"{SAFE_WEIGHTS_INDEX_NAME} in {folder} names {name!r}: only safetensors are read.")
    elif os.path.isfile(single_path):
        files = [SAFE_WEIGHTS_NAME]
    else:
        present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        pickles = [f for f in present if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(
                f"{folder} holds pickled weights ({', '.join(pickles)}) and no safetensors; pickles can run code on "
                "load and are refused. Convert them to safetensors with a tool you trust."
            )
        raise OSError(f"{folder} has no {SAFE_WEIGHTS_NAME} and no {SAFE_WEIGHTS_INDEX_NAME}.")

    index = CheckpointIndex(folder=folder, files=files)
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise OSError(f"{name} (named by {SAFE_WEIGHTS_INDEX_NAME}) is missing from {folder}.")
        data_start, header = _read_header(path, folder)
        index.data_start[name] = data_start
        for tensor, info in header.items():
            if tensor == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise OSError(f"{name} in {folder}: tensor {tensor!r} has dtype {info['dtype']}, which we do not read.")
            if tensor in index.tensors:
                raise OSError(f"{folder}: tensor {tensor!r} is stored twice ({index.tensors[tensor].file} and {name}).")
            begin, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            index.tensors[tensor] = TensorEntry(name, dtype, tuple(info["shape"]), begin, end)
    if weight_map is not None:
        wrong = sorted(t for t, f in weight_map.items() if t not in index.tensors or index.tensors[t].file != f)
        extra = sorted(t for t in index.tensors if t not in weight_map)
        if wrong or extra:
            raise OSError(
                f"{SAFE_WEIGHTS_INDEX_NAME} in {folder} disagrees with its shards: "
                + "; ".join(
                    part
                    for part in (
                        f"not found where the index says: {_format_names(wrong)}" if wrong else "",
                        f"not in the index: {_format_names(extra)}" if extra else "",
                    )
                    if part
                )
            )
    return index


def _read_tensor(fh: Any, data_start: int, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor's bytes from an open file straight into a fresh CPU tensor (no memory map, no extra copy)."""
    nbytes = entry.end - entry.begin
    raw = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        fh.seek(data_start + entry.begin)
        view = memoryview(raw.numpy())
        done = 0
        while done < nbytes:
            n = fh.readinto(view[done:])
            if not n:
                raise OSError(f"{entry.file}: unexpected end of file")
            done += n
    return raw.view(entry.dtype).reshape(entry.shape)


# ---------------------------------------------------------------------------------------------------------------------
# Building and filling the model
# ---------------------------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: Any, config: dict[str, Any], index: Optional[CheckpointIndex]) -> torch.dtype:
    """The dtype to load in: ``dtype`` if given; for None / ``"auto"`` the checkpoint's (``torch_dtype`` in its
    config, else the dtype of most of its elements), float32 when nothing says."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating-point dtype, got {dtype}.")
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"`dtype` must be a torch dtype, 'auto' or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}.")
        return _DTYPE_NAMES[dtype]
    if dtype is not None and dtype != "auto":
        raise ValueError(f"`dtype` must be a torch dtype, 'auto' or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}.")
    named = config.get("torch_dtype") or config.get("dtype")
    if isinstance(named, str) and named in _DTYPE_NAMES:
        return _DTYPE_NAMES[named]
    found = index.floating_dtype() if index is not None else None
    return found or torch.float32


def _device_of(name: str, device_map: dict[str, Any]) -> Any:
    """The device of parameter ``name`` under a module-prefix ``device_map`` (longest matching prefix wins)."""
    best, best_len = device_map.get(""), -1
    for prefix, device in device_map.items():
        if prefix and (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = device, len(prefix)
    if best is None:
        raise ValueError(f"`device_map` places no module holding {name!r}; map '' or every top-level module.")
    return best


def _prepare_device_map(model: nn.Module, device_map: Any, dtype: torch.dtype, max_memory: Any) -> dict[str, Any]:
    """``device_map`` as a module-prefix dict: None -> CPU, a device -> everything there, ``"auto"`` -> accelerate."""
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, (str, torch.device, int)) and device_map not in ("auto", "balanced", "sequential"):
        try:
            return {"": torch.device(device_map)}
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"`device_map` {device_map!r} is not a device, 'auto' or a dict.") from err
    if device_map in ("auto", "balanced", "sequential"):
        try:
            from accelerate import infer_auto_device_map
        except ImportError as err:
            raise ValueError("`device_map='auto'` needs `accelerate` (`pip install accelerate`).") from err
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=list(model._no_split_modules or []), dtype=dtype
        )
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(f"`device_map` must be None, a device, 'auto' or a non-empty dict, got {device_map!r}.")
    for prefix, device in device_map.items():
        if device in ("disk", "meta"):
            raise ValueError(
                f"`device_map` puts {prefix or 'the model'!r} on {device!r}: offloading is not supported when "
                "converting a checkpoint; convert once (`save_pretrained`) and load our format with offloading."
            )
    return dict(device_map)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    else:
        module._buffers[attr] = value


def _model_tensors(model: nn.Module) -> dict[str, torch.Size]:
    """Names and shapes of the parameters (tied ones once) and persistent buffers a checkpoint must fill."""
    tensors = {name: p.shape for name, p in model.named_parameters()}
    for module_name, module in model.named_modules():
        for attr, buf in module._buffers.items():
            if buf is not None and attr not in module._non_persistent_buffers_set:
                tensors[f"{module_name}.{attr}" if module_name else attr] = buf.shape
    return tensors


def build_empty_model(cls: type, config: DFMConfig, dtype: torch.dtype, attn_implementation: Optional[str]) -> Any:
    """``cls(config)`` with its parameters on the meta device (no memory) in ``dtype``."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        return cls._from_config(config, **kwargs)


def _finish(model: Any, name: str) -> Any:
    """Tie, check that nothing stayed on the meta device, switch to eval mode."""
    if model.config.tie_word_embeddings:
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"Converting {name!r} left tensors without values: {_format_names(left)}.")
    model.config._name_or_path = name
    return model.eval()


def fill_from_checkpoint(
    model: Any,
    index: CheckpointIndex,
    names: dict[str, str],
    dtype: torch.dtype,
    device_map: dict[str, Any],
) -> None:
    """Read every checkpoint tensor of ``names`` (checkpoint name -> our name) into ``model``, file by file.

    Floating tensors are cast to ``dtype``; each is read straight into a fresh tensor and moved to its device, so the
    memory held at any time is the model loaded so far plus one tensor.
    """
    by_file: dict[str, list[tuple[str, TensorEntry]]] = {}
    for source, entry in index.tensors.items():
        if source in names:
            by_file.setdefault(entry.file, []).append((source, entry))
    for file, entries in sorted(by_file.items()):
        path = os.path.join(index.folder, file)
        try:
            with open(path, "rb") as fh:
                for source, entry in sorted(entries, key=lambda item: item[1].begin):
                    tensor = _read_tensor(fh, index.data_start[file], entry)
                    if tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    target = names[source]
                    device = _device_of(target, device_map)
                    if torch.device(device).type != "cpu":
                        tensor = tensor.to(device)
                    _set_tensor(model, target, tensor)
                    del tensor
        except OSError as err:
            raise _broken_file(path, index.folder, err) from err


def check_names_and_shapes(
    family: str, index: CheckpointIndex, expected: dict[str, str], model_tensors: dict[str, torch.Size], where: str
) -> dict[str, str]:
    """Check the checkpoint holds exactly the ``expected`` tensors with the model's shapes; return the renaming."""
    present = {n for n in index.tensors if not IGNORED_TENSOR_PATTERN.search(n)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_format_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_format_names(unexpected)}")
        raise ValueError(
            f"{where} does not match the {family} format its config.json describes ({'; '.join(parts)}). "
            "Every tensor must be used and every parameter filled; nothing is initialised at random."
        )
    ours = set(expected.values())
    if ours != set(model_tensors):
        raise ValueError(
            f"{where}: the converted tensors do not cover the model's parameters "
            f"(not filled: {_format_names(set(model_tensors) - ours) or '-'}; "
            f"unknown: {_format_names(ours - set(model_tensors)) or '-'})."
        )
    wrong = [
        f"{source} {tuple(index.tensors[source].shape)} (expected {tuple(model_tensors[target])})"
        for source, target in sorted(expected.items())
        if tuple(index.tensors[source].shape) != tuple(model_tensors[target])
    ]
    if wrong:
        raise ValueError(f"{where}: tensor shapes do not match its config.json: {_format_names(wrong, 6)}.")
    return dict(expected)


# ---------------------------------------------------------------------------------------------------------------------
# Released checkpoints: from_pretrained
# ---------------------------------------------------------------------------------------------------------------------


def read_config_dict(folder: str) -> dict[str, Any]:
    """The ``config.json`` of ``folder`` as a dict (``OSError`` naming the file when missing or not valid JSON)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError as err:
        raise OSError(f"{folder} has no config.json.") from err
    except (OSError, ValueError) as err:
        raise OSError(f"config.json in {folder} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise OSError(f"config.json in {folder} must hold a JSON object.")
    return config


def resolve_folder(
    name: Union[str, os.PathLike],
    allow_patterns: list[str],
    what: str = "model repo",
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    subfolder: str = "",
) -> str:
    """A local folder as is, or the snapshot of Hub repo ``name`` with the files matching ``allow_patterns`` (through
    :func:`dfm_hf.hub.download_snapshot`: revisions, offline cache, errors naming the repo and file)."""
    name = str(name)
    subfolder = subfolder or ""
    if os.path.isdir(name):
        folder = os.path.join(name, subfolder) if subfolder else name
        if not os.path.isdir(folder):
            raise OSError(f"{name} has no subfolder {subfolder!r}.")
        return folder
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or not name.strip():
        raise OSError(f"{name!r} is neither a folder nor a Hub repo id.")
    from ..hub.download import download_snapshot

    patterns = [f"{subfolder.strip('/')}/{p}" for p in allow_patterns] if subfolder else list(allow_patterns)
    snapshot = download_snapshot(
        name,
        patterns,
        what=what,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    folder = os.path.join(snapshot, subfolder) if subfolder else snapshot
    if not os.path.isdir(folder):
        raise OSError(f"Hub repo {name!r} has no subfolder {subfolder!r} with {', '.join(allow_patterns)} files.")
    return folder


def load_released_model(cls: type, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> Any:
    """Load a LLaDA or Dream / DiffuCoder checkpoint (a folder or a Hub repo id) as ``cls`` (converted on load).

    Accepted keyword arguments: ``dtype`` (or ``torch_dtype``; a torch dtype, its name or ``"auto"``, the default:
    the checkpoint's), ``device_map`` (None = CPU, a device, ``"auto"`` through accelerate, or a module-prefix dict),
    ``max_memory`` (with ``"auto"``), ``attn_implementation``, ``output_loading_info``, and the Hub arguments
    ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``subfolder``. Arguments of
    transformers' own loader that do not apply to a conversion (``low_cpu_mem_usage``, ``trust_remote_code``: no remote
    code ever runs...) are ignored; ``use_safetensors=False`` and anything else raise ``TypeError``/``ValueError``.
    """
    name = str(pretrained_model_name_or_path)
    kwargs = dict(kwargs)
    if kwargs.get("use_safetensors") is False:
        raise ValueError("`use_safetensors=False`: released checkpoints are read from safetensors only.")
    if kwargs.get("variant") is not None:
        raise ValueError(f"`variant` {kwargs['variant']!r} is not supported for released checkpoints.")
    for key in _IGNORED_LOAD_KWARGS:
        kwargs.pop(key, None)
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = torch_dtype if dtype is None else dtype
    device_map = kwargs.pop("device_map", None)
    max_memory = kwargs.pop("max_memory", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    output_loading_info = bool(kwargs.pop("output_loading_info", False))
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    for key in ("config", "state_dict", "quantization_config", "gguf_file"):
        if kwargs.get(key) is not None:
            raise ValueError(
                f"`{key}` is not supported when converting a released checkpoint ({name!r}); convert it once "
                "(`save_pretrained`) and load our format with it."
            )
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(
            f"from_pretrained() got unexpected keyword arguments {sorted(kwargs)} for a released checkpoint."
        )

    folder = resolve_folder(name, MODEL_ALLOW_PATTERNS, "released model", **hub)
    source_config = read_config_dict(folder)
    detect_family(source_config)  # refuse unknown model types before reading any weights
    index = read_checkpoint_index(folder)
    family, config = released_dfm_config(source_config, index.tensors)
    dtype = _resolve_dtype(dtype, source_config, index)
    model = build_empty_model(cls, config, dtype, attn_implementation)
    where = f"The {family} checkpoint {name!r}"
    names = check_names_and_shapes(family, index, expected_tensor_names(family, config), _model_tensors(model), where)
    placement = _prepare_device_map(model, device_map, dtype, max_memory)
    fill_from_checkpoint(model, index, names, dtype, placement)
    model = _finish(model, name)
    if len({str(torch.device(d)) for d in placement.values()}) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=placement)
    if output_loading_info:
        empty: dict[str, Any] = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
        return model, {**empty, "error_msgs": []}
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Causal LMs: from_causal_lm
# ---------------------------------------------------------------------------------------------------------------------


def causal_lm_config_to_dfm(config: Any, vocab_size: int, mask_token_id: int) -> dict[str, Any]:
    """``DFMConfig`` keyword arguments for a Llama / Mistral / Qwen2 transformers config (``logits_shift=True``).

    An active sliding window (Mistral, Qwen2 ``use_sliding_window``) caps ``max_position_embeddings`` at the window:
    within it, windowed attention is full attention, so the conversion stays exact. Refused: other model types, rope
    scaling, activations other than SiLU, biases other than Qwen2's q/k/v ones.
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
    max_positions = int(config.max_position_embeddings)
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
        rope_theta=_rope_theta(values, family),
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        logits_shift=True,
        mask_token_id=int(mask_token_id),
        **ids,
    )


#: Tokenizer files fetched with a model (never code): vocabularies, merges, sentencepiece models, chat templates.
TOKENIZER_ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def causal_lm_folder(source: Union[str, os.PathLike], load_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(folder, kwargs)``: a local folder as is, or a Hub repo downloaded through :func:`resolve_folder` (configs,
    safetensors, tokenizer files and the named ``gguf_file`` only: never code or pickles), with the Hub arguments
    (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``subfolder``) consumed."""
    kwargs = dict(load_kwargs)
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
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
    return weight[:rows].float().mean(0).to(weight.dtype)


def convert_causal_lm(
    cls: type, source_model: Any, mask_token_id: Optional[int] = None, real_vocab_size: Optional[int] = None
) -> Any:
    """A ``cls`` model holding the weights of a loaded Llama / Mistral / Qwen2 causal LM (its tensors are shared, not
    copied, except the embedding and head when a row is added).

    ``mask_token_id`` given: that existing id is the mask token (its row is kept). None: a new mask id
    ``real_vocab_size`` (``len(tokenizer)``; default: the number of embedding rows) whose embedding row (and head row
    when untied) is the mean of the rows of the ``real_vocab_size`` real tokens; the table grows by one row only when
    that id is past its end (tokenizers smaller than their table, e.g. Qwen2's, reuse an unused padding row).
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
    config = DFMConfig(**causal_lm_config_to_dfm(source_config, vocab, mask_token_id))
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
    expected = _model_tensors(model)
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
        _set_tensor(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    if head is not None and not tied and "lm_head.weight" not in state:
        raise ValueError("the causal LM has an untied head without weights.")
    return _finish(model, str(getattr(source_config, "_name_or_path", "") or "causal LM"))


def causal_lm_to_dfm(
    cls: type,
    pretrained_model_name_or_path_or_model: Any,
    mask_token: str = "<|mask|>",
    mask_token_id: Optional[int] = None,
    **load_kwargs: Any,
) -> Any:
    """What ``DFMForMaskedGeneration.from_causal_lm`` runs: load (or take) a causal LM and convert it.

    A path or repo id is loaded with ``AutoModelForCausalLM.from_pretrained(..., **load_kwargs)`` (``gguf_file=``,
    ``revision=``, ``dtype=``... reach transformers; a GGUF is dequantized). Without ``mask_token_id`` the new mask
    id is ``len(tokenizer)`` of the tokenizer stored with the model (the number of embedding rows for a model instance
    or when there is none), so that ``tokenizer.add_special_tokens({"mask_token": mask_token})`` gives exactly that
    id; if ``mask_token`` is already a token of that tokenizer, pass its id as ``mask_token_id`` (or choose another
    string): we never overwrite a trained row silently.
    """
    from transformers import PreTrainedModel

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
    return convert_causal_lm(cls, source_model, mask_token_id=mask_token_id, real_vocab_size=real_vocab)


__all__ = [
    "CAUSAL_LM_MODEL_TYPES",
    "CheckpointIndex",
    "MODEL_ALLOW_PATTERNS",
    "RELEASED_MODEL_TYPES",
    "TOKENIZER_ALLOW_PATTERNS",
    "causal_lm_config_to_dfm",
    "causal_lm_folder",
    "causal_lm_to_dfm",
    "convert_causal_lm",
    "detect_family",
    "dream_config_to_dfm",
    "expected_tensor_names",
    "llada_config_to_dfm",
    "llada_to_dfm_name",
    "load_causal_lm",
    "load_causal_lm_tokenizer",
    "load_released_model",
    "new_mask_token_id",
    "read_checkpoint_index",
    "read_config_dict",
    "released_dfm_config",
    "resolve_folder",
]
