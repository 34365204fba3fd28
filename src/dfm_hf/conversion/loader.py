"""The strict loader: a converted model is built on the meta device and filled from a safetensors checkpoint.

Loading is strict: every tensor of the checkpoint is used and every parameter of the model is filled, with the same
shape, else a ``ValueError`` names the tensors (missing and unexpected); names and shapes are checked from the file
headers before any tensor is read. Each tensor is then read from its file into its final place (cast to ``dtype``
and moved to its device on the way), one at a time: no second copy of the weights exists at any time. With a
``quantization_config`` each linear weight is quantized as soon as it is read (:mod:`.quantization`), so the
full-precision model never exists either.
:func:`load_released_model` is what ``DFMForMaskedGeneration.from_pretrained`` runs for LLaDA and Dream checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any, Optional, Union

import torch
from torch import nn

from ..models.configuration_dfm import DFMConfig
from .bd3lm import bd3lm_config_to_dfm, bd3lm_tensor_names
from .checkpoint import (
    HUB_KWARGS,
    MODEL_ALLOW_PATTERNS,
    CheckpointIndex,
    iter_tensors,
    read_checkpoint_index,
    read_config_dict,
    resolve_folder,
)
from .dream import DREAM_QKV_BIAS_TENSOR, dream_config_to_dfm, dream_tensor_names
from .families import IGNORED_TENSOR_PATTERN, _format_names, detect_family
from .fast_dllm_v2 import fast_dllm_v2_config_to_dfm, fast_dllm_v2_tensor_names
from .llada import llada_config_to_dfm, llada_tensor_names
from .llada2 import llada2_config_to_dfm, llada2_tensor_names
from .quantization import finish_quantization, prepare_model, prepare_quantizer, quantized_tensors
from .sdar import sdar_config_to_dfm, sdar_tensor_names

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


def released_dfm_config(config: dict[str, Any], tensor_names: Collection[str] = ()) -> tuple[str, DFMConfig]:
    """``(family, DFMConfig)`` for a released checkpoint's ``config.json`` dict and the names of its tensors."""
    family = detect_family(config)
    if family == "llada":
        kwargs = llada_config_to_dfm(config)
    elif family in ("bd3lm", "mdlm"):
        kwargs = bd3lm_config_to_dfm(config)
    elif family == "sdar":
        kwargs = sdar_config_to_dfm(config)
    elif family == "fast_dllm_v2":
        kwargs = fast_dllm_v2_config_to_dfm(config)
    elif family == "llada2":
        kwargs = llada2_config_to_dfm(config)
    else:
        kwargs = dream_config_to_dfm(config, has_qkv_bias=DREAM_QKV_BIAS_TENSOR in set(tensor_names))
    return family, DFMConfig(**kwargs)


#: What a checkpoint tensor fills: one parameter (its name), or several (a tuple of names) that it holds stacked along
#: its first dimension, in that order (a fused projection, e.g. LLaDA2's ``query_key_value`` -> q, k, v).
Target = Union[str, tuple[str, ...]]


def expected_tensor_names(family: str, config: DFMConfig) -> dict[str, Target]:
    """Checkpoint tensor name -> our parameter name(s) (:data:`Target`), for every tensor a checkpoint of ``family``
    must hold."""
    if family in ("bd3lm", "mdlm"):
        return bd3lm_tensor_names(config)
    if family == "sdar":
        return sdar_tensor_names(config)
    if family == "fast_dllm_v2":
        return fast_dllm_v2_tensor_names(config)
    if family == "llada2":
        return llada2_tensor_names(config)
    return llada_tensor_names(config) if family == "llada" else dream_tensor_names(config)


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


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of parameter or buffer ``name`` of ``model`` (a parameter keeps its ``requires_grad``
    where ``value`` is floating; a ``value`` that is already a parameter, e.g. a quantized one, goes in as it is)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(value, nn.Parameter):
        module._parameters[attr] = value
    elif attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    else:
        module._buffers[attr] = value


def model_tensors(model: nn.Module) -> dict[str, torch.Size]:
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


def finish_model(model: Any, name: str) -> Any:
    """Tie, check that nothing stayed on the meta device, record ``name`` as the source, switch to eval mode."""
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
    names: dict[str, Target],
    dtype: torch.dtype,
    device_map: dict[str, Any],
    quantizer: Any = None,
    shapes: Optional[dict[str, torch.Size]] = None,
) -> None:
    """Read every checkpoint tensor of ``names`` (checkpoint name -> our name, or names: a fused tensor is cut along
    its first dimension into the shapes of its parameters, ``shapes``: :func:`model_tensors` of the empty model) into
    ``model``, file by file.

    Floating tensors are cast to ``dtype``; each is read into a fresh tensor and moved to its device, then quantized
    when ``quantizer`` (:func:`.quantization.prepare_quantizer`, the model prepared by it) says so, so the memory held
    at any time is the model loaded so far plus one full-precision tensor.
    """
    for source, tensor in iter_tensors(index, [source for source in names if source in index.tensors]):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        targets = names[source] if isinstance(names[source], tuple) else (names[source],)
        pieces = tensor.split([shapes[t][0] for t in targets]) if len(targets) > 1 else (tensor,)
        for target, piece in zip(targets, pieces):
            device = _device_of(target, device_map)
            if torch.device(device).type != "cpu":
                piece = piece.to(device)
            _put(model, target, piece, quantizer)
            del piece
        del tensor


def _put(model: Any, name: str, tensor: torch.Tensor, quantizer: Any) -> None:
    """Set weight ``name`` of ``model`` to ``tensor``, quantized when ``quantizer`` (if any) says so."""
    filled = quantized_tensors(quantizer, model, name, tensor) if quantizer is not None else {name: tensor}
    for filled_name, value in filled.items():
        set_tensor(model, filled_name, value)


def quantize_model(model: Any, quantization_config: Any) -> Any:
    """Quantize a filled ``model`` in place and return it (what the causal-LM conversion runs after converting).

    ``quantization_config``: a transformers ``TorchAoConfig`` or ``BitsAndBytesConfig``, checked by the caller. The
    weights are taken out of the model, the quantizer prepares it (as it prepares an empty one), and each weight is
    put back, quantized where the quantizer says so, one at a time: full-precision weights that nothing else holds
    are freed as they go, so the model never exists twice. bitsandbytes moves the model to its GPU.
    """
    quantizer, device_map = prepare_quantizer(quantization_config, None)
    device = (device_map or {}).get("")
    state = model.state_dict()
    prepare_model(quantizer, model, model.dtype, device_map)
    for name in list(state):
        tensor = state.pop(name)
        _put(model, name, tensor if device is None else tensor.to(device), quantizer)
        del tensor
    if device is not None:  # buffers a checkpoint does not hold (rotary frequencies) follow the weights
        for name, buffer in list(model.named_buffers()):
            set_tensor(model, name, buffer.to(device))
    model = finish_model(model, str(model.config._name_or_path))
    finish_quantization(quantizer, model)
    return model


def check_names_and_shapes(
    family: str, index: CheckpointIndex, expected: dict[str, Target], tensors: dict[str, torch.Size], where: str
) -> dict[str, Target]:
    """Check the checkpoint holds exactly the ``expected`` tensors with the model's shapes (``tensors``: our names and
    shapes, :func:`model_tensors`; a fused tensor has its parameters' shapes stacked along the first dimension);
    return the renaming (checkpoint name -> our name or names)."""
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
    fused = {source: (t,) if isinstance(t, str) else t for source, t in expected.items()}
    ours = {target for targets in fused.values() for target in targets}
    if ours != set(tensors):
        raise ValueError(
            f"{where}: the converted tensors do not cover the model's parameters "
            f"(not filled: {_format_names(set(tensors) - ours) or '-'}; "
            f"unknown: {_format_names(ours - set(tensors)) or '-'})."
        )
    stacked = {
        source: (sum(tensors[t][0] for t in targets), *tensors[targets[0]][1:])
        if all(tuple(tensors[t][1:]) == tuple(tensors[targets[0]][1:]) for t in targets)
        else None
        for source, targets in fused.items()
    }
    wrong = [
        f"{source} {tuple(index.tensors[source].shape)} (expected {shape})"
        for source, shape in sorted(stacked.items(), key=lambda item: item[0])
        if shape is None or tuple(index.tensors[source].shape) != tuple(shape)
    ]
    if wrong:
        raise ValueError(f"{where}: tensor shapes do not match its config.json: {_format_names(wrong, 6)}.")
    return dict(expected)


def load_released_model(cls: type, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> Any:
    """Load a LLaDA or Dream / DiffuCoder checkpoint (a folder or a Hub repo id) as ``cls`` (converted on load).

    Accepted keyword arguments: ``dtype`` (or ``torch_dtype``; a torch dtype, its name or ``"auto"``, the default:
    the checkpoint's), ``device_map`` (None = CPU, a device, ``"auto"`` through accelerate, or a module-prefix dict),
    ``max_memory`` (with ``"auto"``), ``attn_implementation``, ``output_loading_info``, ``quantization_config`` (a
    ``TorchAoConfig`` or ``BitsAndBytesConfig``, checked by the caller: the weights are quantized as they are read),
    and the Hub arguments
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
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    quantization_config = kwargs.pop("quantization_config", None)
    for key in ("config", "state_dict", "gguf_file"):
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
    quantizer = None
    if quantization_config is not None:
        quantizer, device_map = prepare_quantizer(quantization_config, device_map)
        dtype = quantizer.update_dtype(dtype)
    model = build_empty_model(cls, config, dtype, attn_implementation)
    where = f"The {family} checkpoint {name!r}"
    shapes = model_tensors(model)
    names = check_names_and_shapes(family, index, expected_tensor_names(family, config), shapes, where)
    placement = _prepare_device_map(model, device_map, dtype, max_memory)
    if quantizer is not None:
        prepare_model(quantizer, model, dtype, placement)
    fill_from_checkpoint(model, index, names, dtype, placement, quantizer, shapes)
    model = finish_model(model, name)
    if quantizer is not None:
        finish_quantization(quantizer, model)
    if len({str(torch.device(d)) for d in placement.values()}) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=placement)
    if output_loading_info:
        empty: dict[str, Any] = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
        return model, {**empty, "error_msgs": []}
    return model
