"""The loading policy of our own checkpoints: strict, with errors that name what is wrong.

Loading stays strict: a missing, unexpected or mismatched weight raises naming it (nothing is initialised at random),
and a broken weights file raises naming the file and its folder. ``quantization_config=`` accepts the backends of
:data:`ACCEPTED_QUANTIZATION` (:func:`check_quantization_config`). Imports only the standard library, ``transformers``
and ``safetensors``: it travels with ``modeling_dfm.py`` as remote code.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

#: ``from_pretrained`` keyword arguments that say where a checkpoint's files come from.
HUB_KEYS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")
#: What ``quantization_config=`` accepts, in words (errors quote it).
ACCEPTED_QUANTIZATION = (
    "None, a transformers `TorchAoConfig` (e.g. `TorchAoConfig(torchao.quantization.Int8WeightOnlyConfig())`: int8 "
    "weight-only, CPU or GPU) or a `BitsAndBytesConfig(load_in_4bit=True)` / `BitsAndBytesConfig(load_in_8bit=True)` "
    "(CUDA only), or the dict of one of them (`config.to_dict()`)"
)


def check_quantization_config(quantization_config: Any, gguf_source: bool = False) -> Any:
    """``quantization_config`` as a transformers ``TorchAoConfig`` or ``BitsAndBytesConfig`` (a dict of one is
    turned into it), or None; ``ValueError`` naming the argument and :data:`ACCEPTED_QUANTIZATION` for anything else,
    for a ``BitsAndBytesConfig`` that loads neither 4- nor 8-bit, and for bitsandbytes without a CUDA device.
    ``gguf_source``: a ``GgufConfig`` passes too, as it is (it says how to read a causal LM's GGUF file)."""
    if quantization_config is None:
        return None
    from transformers import BitsAndBytesConfig, GgufConfig, TorchAoConfig

    if gguf_source and isinstance(quantization_config, GgufConfig):
        return quantization_config

    config = quantization_config
    if isinstance(config, dict):
        method = str(getattr(config.get("quant_method"), "value", config.get("quant_method")))
        classes = {"torchao": TorchAoConfig, "bitsandbytes": BitsAndBytesConfig}
        if method not in classes:
            raise ValueError(f"`quantization_config` has quant_method {method!r}; accepted: {ACCEPTED_QUANTIZATION}.")
        config = classes[method].from_dict(config)
    if isinstance(config, TorchAoConfig):
        return config
    if isinstance(config, BitsAndBytesConfig):
        if not (config.load_in_4bit or config.load_in_8bit):
            raise ValueError(
                "`quantization_config` is a BitsAndBytesConfig that loads neither 4- nor 8-bit: pass "
                "`load_in_4bit=True` or `load_in_8bit=True`."
            )
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "`quantization_config` is a BitsAndBytesConfig: bitsandbytes 4/8-bit needs a CUDA GPU and none is "
                "available; on CPU pass `TorchAoConfig(Int8WeightOnlyConfig())` (torchao) instead."
            )
        return config
    raise ValueError(f"`quantization_config` got {type(config).__name__}; accepted: {ACCEPTED_QUANTIZATION}.")


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in HUB_KEYS if kwargs.get(k) is not None}


def _config_file(name: Any, kwargs: dict[str, Any]) -> Optional[str]:
    """The local path of the ``config.json`` of checkpoint ``name`` (a folder or Hub repo id), or None."""
    from transformers.utils import cached_file

    try:
        return cached_file(
            str(name),
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **_hub_kwargs(kwargs),
        )
    except Exception:  # no reachable config.json: transformers reports it when it loads
        return None


def checkpoint_model_type(name: Any, kwargs: dict[str, Any]) -> Optional[str]:
    """The ``model_type`` of the ``config.json`` of checkpoint ``name`` (a folder or Hub repo id), or None when there
    is none to read (a config object passed in, a GGUF file, no readable config: transformers reports those)."""
    from transformers import PretrainedConfig

    if name is None or isinstance(kwargs.get("config"), PretrainedConfig) or kwargs.get("gguf_file"):
        return None
    path = _config_file(name, kwargs)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except Exception:  # no readable config.json: transformers reports it when it loads
        return None


def _weight_files(name: Any, kwargs: dict[str, Any]) -> list[str]:
    """The safetensors files of checkpoint ``name`` present locally (a folder, or the local Hub cache)."""
    from transformers.utils import cached_file

    sub = kwargs.get("subfolder") or ""
    if os.path.isdir(os.path.join(str(name), sub)):
        folder = os.path.join(str(name), sub)
        return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]
    files: list[str] = []
    offline = {**_hub_kwargs(kwargs), "local_files_only": True}
    for filename in ("model.safetensors", "model.safetensors.index.json"):
        try:
            found = cached_file(str(name), filename, _raise_exceptions_for_missing_entries=False, **offline)
        except Exception:
            found = None
        if found and filename.endswith(".json"):
            with open(found, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            files += [os.path.join(os.path.dirname(found), s) for s in shards]
        elif found:
            files.append(found)
    return files


def broken_weights_error(name: Any, kwargs: dict[str, Any]) -> Optional[OSError]:
    """An ``OSError`` naming the first unreadable (e.g. truncated) safetensors file of checkpoint ``name``, or None
    when every local weights file reads: called after a failed load, to say which file broke it."""
    from safetensors import safe_open

    if name is None:
        return None
    for path in _weight_files(name, kwargs):
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as broken:
            return OSError(
                f"{os.path.basename(path)} in {os.path.dirname(path)} (checkpoint {str(name)!r}) is not a valid "
                f"safetensors file ({broken}); it may be truncated or corrupted (an interrupted download or save): "
                "download or save it again."
            )
    return None


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def record_quantized_mismatches(model: Any, info: dict[str, Any]) -> None:
    """Add to ``info["mismatched_keys"]`` every weight of a quantized ``model`` whose shape differs from the shape its
    config gives (transformers does not compare the shape of a weight it quantizes on load); a no-op for a model that
    is not quantized. A quantized weight's shape is its logical one (a bitsandbytes 4-bit weight's ``quant_state``)."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    import torch

    with torch.device("meta"):
        expected = {name: p.shape for name, p in type(model)(model.config).named_parameters()}
    found = set(info.get("mismatched_keys") or [])
    for name, param in model.named_parameters():
        shape = getattr(getattr(param, "quant_state", None), "shape", None) or param.shape
        if name in expected and tuple(shape) != tuple(expected[name]):
            found.add((name, tuple(shape), tuple(expected[name])))
    info["mismatched_keys"] = found


def check_loading_info(name: Any, info: dict[str, Any], kwargs: Optional[dict[str, Any]] = None) -> None:
    """Raise ``ValueError`` naming the checkpoint's files and every missing, unexpected or mismatched weight of
    transformers' loading report (a mismatched one with its shape in the weights and the shape its config gives).

    ``info`` is the report of ``from_pretrained(..., output_loading_info=True, ignore_mismatched_sizes=True)``: its
    ``mismatched_keys`` hold ``(name, shape in the weights, shape of the model built from config.json)``; ``kwargs``
    are the ``from_pretrained`` keyword arguments that locate the files (``subfolder``, ``revision``...).
    """
    mismatched = []
    for key in sorted(info.get("mismatched_keys") or [], key=lambda k: str(k[0] if isinstance(k, tuple) else k)):
        if isinstance(key, tuple) and len(key) == 3:
            mismatched.append(f"{key[0]} (weights {_shape(key[1])}, config.json {_shape(key[2])})")
        else:
            mismatched.append(str(key[0] if isinstance(key, tuple) else key))
    problems = {
        "missing weights": sorted(info.get("missing_keys") or []),
        "unexpected weights": sorted(info.get("unexpected_keys") or []),
        "mismatched shapes": mismatched,
    }
    if not any(problems.values()):
        return
    details = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
    kwargs = kwargs or {}
    config = _config_file(name, kwargs) if name is not None else None
    files = _weight_files(name, kwargs) if name is not None else []
    weights = f" {', '.join(files)}" if files else ""
    raise ValueError(
        f"{config or 'The config.json'} does not match the weights{weights} of checkpoint {str(name)!r} "
        f"({details}); nothing is initialised at random. Fix the config or the weights, or pass "
        "`output_loading_info=True` to load it anyway and inspect the report."
    )
