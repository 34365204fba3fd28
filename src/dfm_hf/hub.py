"""Sharing DFM pipelines, scheduler presets and LoRA adapters on the Hugging Face Hub.

- Model cards: :func:`render_pipeline_card`, :func:`render_lora_card`, :func:`write_training_card`.
- Pushing: :func:`push_pipeline_to_hub` (what ``DFMPipeline.push_to_hub`` runs), :func:`push_pipeline_folder`,
  :func:`push_scheduler_preset`, :func:`push_lora_adapter`. Each push is a single commit.
- Pulling: :func:`download_pipeline` / :func:`download_snapshot` (what ``DFMPipeline.download`` and
  ``load_lora_weights`` run): ``snapshot_download`` of safe files only, with errors that name the repo and the file.
- :func:`list_scheduler_presets` of a folder or a Hub repo.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from importlib import resources
from typing import Any, Optional

from .pipelines.presets import _PRESET_CLASSES, PRESET_SPECS, PRESETS_DIR

TAGS = ["discrete-flow-matching", "dfm_hf", "text-generation", "code"]

#: Files a pipeline download fetches: configs, safetensors weights, tokenizer files, presets, the card. Never code.
PIPELINE_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.md"]
#: Added to :data:`PIPELINE_ALLOW_PATTERNS` with ``allow_pickle=True``.
PICKLE_ALLOW_PATTERNS = ["*.bin"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Never uploaded from a pipeline folder: training checkpoints and temporary files.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", ".tmp-*", "*.incomplete", "*.tmp", ".git/*", ".cache/*", "__pycache__/*"]
_SAVE_KWARGS = ("safe_serialization", "variant", "max_shard_size")
_CARD_KWARGS = ("training", "metrics", "datasets", "license", "limitations")
_DEFAULT_LIMITATIONS = "A small model: its samples are short-range plausible code, not reliable programs."
_PIPELINE_USAGE_RE = re.compile(r"((?:DFMPipeline|DiscreteFlowScheduler)\.from_pretrained\(\s*)\"[^\"\n]*\"")
_LORA_USAGE_RE = re.compile(r"(\.load_lora_weights\(\s*)\"[^\"\n]*\"")
_PRESET_HEADER_RE = re.compile(r"^\|\s*preset\s*\|.*\|\s*$")


# --------------------------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------------------------


def _template(name: str) -> str:
    return resources.files("dfm_hf").joinpath("model_cards", name).read_text(encoding="utf-8")


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{{ " + key + " }}", value)
    return template


_NO_PRESETS_ROW = "| (none) | no scheduler presets are saved with this pipeline |"


def presets_table(names: Optional[list[str]] = None) -> str:
    """Markdown rows ``| name | use |`` of the presets ``names`` (default: the shipped ones)."""
    names = list(PRESET_SPECS) if names is None else names
    if not names:
        return _NO_PRESETS_ROW
    return "\n".join(f"| `{n}` | {PRESET_SPECS[n][2] if n in PRESET_SPECS else 'custom preset'} |" for n in names)


def render_pipeline_card(
    repo_id: str,
    training: Optional[dict[str, Any]] = None,
    metrics: Optional[dict[str, Any]] = None,
    license: str = "apache-2.0",
    datasets: Optional[list[str]] = None,
    limitations: str = _DEFAULT_LIMITATIONS,
    preset_names: Optional[list[str]] = None,
    evaluation_section: Optional[str] = None,
) -> Any:
    """A ``huggingface_hub.ModelCard`` for a DFM pipeline: YAML metadata, usage, presets, training, metrics.

    The metadata holds ``library_name: dfm_hf``, the tags, ``pipeline_tag``, ``license``, ``datasets`` (when given)
    and a ``model-index`` with one result per numeric entry of ``metrics`` (when given).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    numeric = {
        k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    eval_results = None
    if numeric:
        dataset = datasets[0] if datasets else "held-out"
        eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset,
                dataset_name=dataset if datasets else "held-out validation files",
                dataset_split="validation",
                metric_type=name,
                metric_name=name,
                metric_value=value,
            )
            for name, value in numeric.items()
        ]
    model_name = repo_id.split("/")[-1]
    data = ModelCardData(
        library_name="dfm_hf",
        tags=list(TAGS),
        pipeline_tag="text-generation",
        license=license,
        datasets=list(datasets) if datasets else None,
        model_name=model_name,
        eval_results=eval_results,
    )
    training_section = "Not recorded."
    if training:
        shown = {k: v for k, v in training.items() if not k.startswith("_") and k != "coupling_spec"}
        training_section = "```json\n" + json.dumps(shown, indent=2, default=str) + "\n```"
    if evaluation_section is None:
        evaluation_section = "Not measured."
        if numeric:
            rows = [f"| {k} | {v:.4g} |" for k, v in numeric.items()]
            evaluation_section = "| metric | value |\n|---|---|\n" + "\n".join(rows)
        if metrics and metrics.get("samples"):
            evaluation_section += "\n\nSamples:\n\n" + "\n\n".join(
                "```python\n" + s + "\n```" for s in metrics["samples"]
            )
    text = _fill(
        _template("pipeline_card.md"),
        {
            "card_data": data.to_yaml(),
            "model_name": model_name,
            "repo_id": repo_id,
            "presets_table": presets_table(preset_names),
            "training_section": training_section,
            "evaluation_section": evaluation_section,
            "limitations": limitations,
        },
    )
    return ModelCard(text)


def render_lora_card(
    repo_id: str, base_model: str, adapter_name: str = "default", training: Optional[dict[str, Any]] = None
) -> Any:
    """A ``ModelCard`` for a LoRA adapter repo that names its base model (``base_model`` metadata)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="peft", tags=TAGS + ["lora"], base_model=base_model, pipeline_tag="text-generation"
    )
    training_section = "```json\n" + json.dumps(training or {}, indent=2, default=str) + "\n```"
    text = _fill(
        _template("lora_card.md"),
        {
            "card_data": data.to_yaml(),
            "model_name": repo_id.split("/")[-1],
            "repo_id": repo_id,
            "base_model": base_model,
            "adapter_name": adapter_name,
            "training_section": training_section,
            "limitations": "Inherits the base model's limitations; trained on a small corpus.",
        },
    )
    return ModelCard(text)


def write_training_card(output_dir: str, training_args: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Write ``README.md`` (the model card) of a trained pipeline folder atomically; returns its path."""
    name = os.path.basename(os.path.abspath(output_dir))
    card = render_pipeline_card(name, training_args, metrics, preset_names=list_scheduler_presets(output_dir))
    path = os.path.join(output_dir, "README.md")
    tmp = path + ".tmp"
    card.save(tmp)
    os.replace(tmp, path)
    return path


def _card_data(text: str) -> dict[str, Any]:
    """The YAML metadata of a card ({} if it has none or it does not parse)."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # an unparsable card is the user's: keep it untouched
        return {}


def _is_our_card(text: str) -> bool:
    """Whether ``text`` is a pipeline card rendered by :func:`render_pipeline_card`."""
    return _card_data(text).get("library_name") == "dfm_hf"


def _retarget_card(text: str, repo_id: str, pattern: re.Pattern[str] = _PIPELINE_USAGE_RE) -> str:
    """Point the usage snippets of a card of ours (e.g. written by training for a local folder) at ``repo_id``."""
    return pattern.sub(lambda m: f'{m.group(1)}"{repo_id}"', text)


def _pipeline_card_text(pipe: Any, folder: str, repo_id: str, card: Any, options: dict[str, Any]) -> str:
    """The README.md to push with a pipeline folder (see :func:`push_pipeline_folder` for the order of choice)."""
    if card is not None:
        return str(card)
    presets = list_scheduler_presets(folder)
    if any(options.get(k) is not None for k in _CARD_KWARGS):
        options = {k: v for k, v in options.items() if v is not None}
        return str(render_pipeline_card(repo_id, preset_names=presets, **options))
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None) if pipe is not None else None
    for candidate in (folder, source):
        if candidate and os.path.isfile(os.path.join(str(candidate), "README.md")):
            with open(os.path.join(str(candidate), "README.md"), encoding="utf-8") as f:
                text = f.read()
            return _retarget_card(text, repo_id) if _is_our_card(text) else text
    return str(render_pipeline_card(repo_id, preset_names=presets))


def _add_preset_row(text: str, name: str, description: str) -> Optional[str]:
    """``text`` with the row of preset ``name`` added to (or replaced in) its presets table; None if it has none."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not _PRESET_HEADER_RE.match(line) or i + 1 >= len(lines) or not lines[i + 1].startswith("|"):
            continue
        end = i + 2
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        row = f"| `{name}` | {description} |"
        for j in range(i + 2, end):
            if lines[j].startswith(f"| `{name}` |"):
                lines[j] = row
                break
        else:
            lines.insert(end, row)
        return "\n".join(line for line in lines if line != _NO_PRESETS_ROW)
    return None


# --------------------------------------------------------------------------------------------------------------------
# Pushing
# --------------------------------------------------------------------------------------------------------------------


def _prepare_branch(api: Any, repo_id: str, revision: Optional[str]) -> None:
    """Create branch ``revision`` (from the default branch) if it is not the default branch and does not exist."""
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)


def list_scheduler_presets(path_or_repo: str, revision: Optional[str] = None, token: Optional[str] = None) -> list[str]:
    """Names of the scheduler presets stored in a pipeline folder or Hub repo (sorted; empty if none)."""
    if os.path.isdir(path_or_repo):
        root = os.path.join(path_or_repo, PRESETS_DIR)
        if not os.path.isdir(root):
            return []
        return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "scheduler_config.json")))
    from huggingface_hub import HfApi

    files = HfApi(token=token).list_repo_files(path_or_repo, revision=revision)
    return sorted(
        {
            parts[1]
            for parts in (f.split("/") for f in files)
            if len(parts) == 3 and parts[0] == PRESETS_DIR and parts[2] == "scheduler_config.json"
        }
    )


def push_pipeline_folder(
    pipe: Any,
    folder: str,
    repo_id: Optional[str] = None,
    *,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    create_pr: Optional[bool] = None,
    card: Any = None,
    training: Optional[dict[str, Any]] = None,
    metrics: Optional[dict[str, Any]] = None,
    datasets: Optional[list[str]] = None,
    license: Optional[str] = None,
    limitations: Optional[str] = None,
    ignore_patterns: Optional[list[str]] = None,
    **save_kwargs: Any,
) -> Any:
    """Upload a saved pipeline folder to ``repo_id`` (created if needed) in one commit, with a model card.

    ``revision`` pushes to that branch, created from ``main`` if needed. Training checkpoints and temporary files
    (:data:`PUSH_IGNORE_PATTERNS`, plus ``ignore_patterns``) are not uploaded. The ``README.md`` pushed is, in order:
    ``card`` (a ``ModelCard`` or text); a fresh :func:`render_pipeline_card` when any of ``training``, ``metrics``,
    ``datasets``, ``license``, ``limitations`` is given; the folder's own ``README.md`` (e.g. written by training);
    the ``README.md`` of the local folder ``pipe`` was loaded from; a fresh card. A kept dfm_hf card gets its usage
    snippets pointed at ``repo_id``. ``save_kwargs`` (``safe_serialization``, ``variant``, ``max_shard_size``) are
    accepted and ignored: they only matter when saving. Returns the ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import filter_repo_objects

    unknown = sorted(set(save_kwargs) - set(_SAVE_KWARGS))
    if unknown:
        raise TypeError(f"push_pipeline_folder() got unexpected keyword arguments {unknown}.")
    if not repo_id:
        raise ValueError("`repo_id` is required to push a pipeline.")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError(f"`folder` {folder!r} has no model_index.json: save the pipeline there first.")
    options = dict(training=training, metrics=metrics, datasets=datasets, license=license, limitations=limitations)
    readme = _pipeline_card_text(pipe, folder, repo_id, card, options)

    paths = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel_root = os.path.relpath(root, folder)
        paths += sorted(f if rel_root == "." else f"{rel_root}/{f}".replace(os.sep, "/") for f in files)
    paths = [p for p in paths if p != "README.md"]
    paths = list(filter_repo_objects(paths, ignore_patterns=PUSH_IGNORE_PATTERNS + list(ignore_patterns or [])))
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=os.path.join(folder, p)) for p in paths]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")))

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    _prepare_branch(api, repo_id, revision)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload DFMPipeline",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def push_pipeline_to_hub(pipe: Any, repo_id: str, **kwargs: Any) -> Any:
    """``pipe.save_pretrained`` into a temp folder, then :func:`push_pipeline_folder` it to ``repo_id``.

    ``safe_serialization`` / ``variant`` / ``max_shard_size`` go to ``save_pretrained``, the rest (``revision``,
    ``commit_message``, ``private``, ``token``, card fields...) to :func:`push_pipeline_folder`.
    """
    save_kwargs = {k: kwargs.pop(k) for k in _SAVE_KWARGS if k in kwargs}
    with tempfile.TemporaryDirectory(prefix="dfm-push-") as tmp:
        pipe.save_pretrained(tmp, **save_kwargs)
        return push_pipeline_folder(pipe, tmp, repo_id=repo_id, **kwargs)


def push_scheduler_preset(
    scheduler: Any,
    repo_id: str,
    name: str,
    revision: Optional[str] = None,
    *,
    description: Optional[str] = None,
    commit_message: Optional[str] = None,
    token: Optional[str] = None,
) -> Any:
    """Upload ``scheduler``'s config as ``scheduler_presets/<name>/scheduler_config.json`` of a pipeline repo.

    ``revision`` pushes to that branch (created from ``main`` if needed). When the repo's ``README.md`` has the
    presets table of a dfm_hf card, the preset's row (``description``, default "custom <class> preset") is added in the
    same commit. Pipelines pulled afterwards list the preset (``pipe.load_scheduler_preset(name)``); it also loads with
    ``Scheduler.from_pretrained(repo_id, subfolder=f"scheduler_presets/{name}")``. Returns the ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import EntryNotFoundError

    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"preset `name` must be a plain folder name, got {name!r}.")
    if type(scheduler) not in _PRESET_CLASSES.values():
        raise ValueError(
            f"`scheduler` must be one of {sorted(_PRESET_CLASSES)} (pipelines load no other preset class), "
            f"got {type(scheduler).__name__}."
        )
    api = HfApi(token=token)
    _prepare_branch(api, repo_id, revision)
    head = api.model_info(repo_id, revision=revision).sha
    path = f"{PRESETS_DIR}/{name}/scheduler_config.json"
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=scheduler.to_json_string().encode("utf-8"))]
    try:
        with tempfile.TemporaryDirectory(prefix="dfm-card-") as tmp:
            readme_file = api.hf_hub_download(repo_id, "README.md", revision=head, cache_dir=tmp)
            with open(readme_file, encoding="utf-8") as f:
                readme = f.read()
    except EntryNotFoundError:
        readme = None
    if readme is not None and _is_our_card(readme):
        updated = _add_preset_row(readme, name, description or f"custom `{type(scheduler).__name__}` preset")
        if updated is not None and updated != readme:
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=updated.encode("utf-8")))
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Add scheduler preset {name}",
        revision=revision,
        parent_commit=head,  # the card edit was made on this commit: refuse to overwrite a newer one
    )


def push_lora_adapter(
    adapter_dir: str,
    repo_id: str,
    base_model: str,
    adapter_name: str = "default",
    revision: Optional[str] = None,
    *,
    training: Optional[dict[str, Any]] = None,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
) -> Any:
    """Upload a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) and its card.

    ``base_model`` is the Hub id of the DFM pipeline it was trained on: the card names it (``base_model``
    metadata and usage), and the uploaded ``adapter_config.json`` records it as ``base_model_name_or_path`` when that
    is empty or a local path. ``adapter_name`` is the name the card's snippet loads it under. The card is the folder's
    ``README.md`` when :func:`render_lora_card` wrote it for the same base model (e.g. LoRA fine-tuning did; its
    snippet is pointed at ``repo_id``) and ``training`` is None; otherwise a fresh one (``training`` goes in it,
    default: the LoRA hyper-parameters; peft's own template card is replaced). The repo is created if needed;
    ``revision`` pushes to that branch. Returns the ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from .pipelines.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, local_adapter_files

    if not isinstance(base_model, str) or not base_model.strip() or os.path.isdir(base_model):
        raise ValueError(f"`base_model` must be the Hub repo id of the base pipeline, got {base_model!r}.")
    config_file, weights_file = local_adapter_files(
        adapter_dir, "adapter_dir", "save the adapter with peft's `save_pretrained`, safetensors format"
    )
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"`adapter_dir` {adapter_dir!r} does not hold a LORA adapter config.")
    recorded = config.get("base_model_name_or_path")
    if not recorded or os.path.isabs(str(recorded)) or os.path.exists(str(recorded)):
        config["base_model_name_or_path"] = base_model
    card = None
    readme = os.path.join(adapter_dir, "README.md")
    if training is None and os.path.isfile(readme):
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        data = _card_data(text)
        if "dfm_hf" in (data.get("tags") or []) and data.get("base_model") == base_model:
            card = _retarget_card(text, repo_id, _LORA_USAGE_RE)
    if card is None:
        if training is None:
            keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora")
            training = {"lora": {k: config[k] for k in keys if k in config}}
        card = str(render_lora_card(repo_id, base_model, adapter_name=adapter_name, training=training))
    operations = [
        CommitOperationAdd(path_in_repo=ADAPTER_CONFIG, path_or_fileobj=json.dumps(config, indent=2).encode()),
        CommitOperationAdd(path_in_repo=ADAPTER_WEIGHTS, path_or_fileobj=weights_file),
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")),
    ]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    _prepare_branch(api, repo_id, revision)
    return api.create_commit(
        repo_id, operations, commit_message=commit_message or "Upload LoRA adapter", revision=revision
    )


# --------------------------------------------------------------------------------------------------------------------
# Pulling
# --------------------------------------------------------------------------------------------------------------------


def _cache_root(cache_dir: Optional[str]) -> str:
    from huggingface_hub import constants

    return str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE


def _cached_commit(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[str]:
    from huggingface_hub.file_download import repo_folder_name

    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = os.path.join(_cache_root(cache_dir), repo_folder_name(repo_id=repo_id, repo_type="model"), "refs", revision)
    try:
        with open(ref, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _cached_repo_files(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[list[str]]:
    """The repo's file list at ``revision`` as cached by the last ``snapshot_download`` (no request), or None."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    commit = _cached_commit(repo_id, revision, cache_dir)
    if commit is None:
        return None
    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None


def _where(what: str, repo_id: str, revision: Optional[str]) -> str:
    from huggingface_hub import constants

    at = f" at revision {revision!r}" if revision else ""
    return f"{what} {repo_id!r}{at} (Hub {constants.ENDPOINT})"


def _redownload_missing(
    repo_id: str, allow_patterns: list[str], revision: Optional[str], cache_dir: Optional[str], **hub: Any
) -> Optional[str]:
    """After a failed ``snapshot_download``: fetch the files still missing one by one, so that a persistent failure
    is reported with the file it concerns (and a transient one is retried once). Returns the snapshot folder, or
    None when the repo's file list is not cached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import filter_repo_objects

    commit = _cached_commit(repo_id, revision, cache_dir)
    files = _cached_repo_files(repo_id, revision, cache_dir)
    if commit is None or files is None:
        return None
    snapshot = os.path.join(_cache_root(cache_dir), repo_folder_name(repo_id=repo_id, repo_type="model"))
    snapshot = os.path.join(snapshot, "snapshots", commit)
    for path in filter_repo_objects(files, allow_patterns=allow_patterns):
        if os.path.isfile(os.path.join(snapshot, *path.split("/"))):
            continue
        try:
            hf_hub_download(repo_id, path, revision=commit, cache_dir=cache_dir, **hub)
        except ValueError:
            raise
        except Exception as err:
            raise _FileDownloadError(path, err) from err
    return snapshot


class _FileDownloadError(Exception):
    def __init__(self, path: str, error: Exception) -> None:
        super().__init__(path)
        self.path, self.error = path, error


def download_snapshot(
    repo_id: str,
    allow_patterns: list[str],
    *,
    what: str = "Hub repo",
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """``snapshot_download`` of the files of ``repo_id`` matching ``allow_patterns``; returns the snapshot folder.

    Works offline from a complete cached snapshot (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``). Failures
    raise an ``OSError`` naming the repo, the revision and, for a download that failed, the file; no partial file is
    left in the cache (``huggingface_hub`` downloads to ``*.incomplete`` files that are only renamed when complete).
    Invalid repo ids raise ``huggingface_hub``'s ``HFValidationError`` (a ``ValueError``).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = dict(token=token, force_download=force_download)
    where = _where(what, repo_id, revision)
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=allow_patterns,
            **hub,
        )
    except RevisionNotFoundError as err:
        raise OSError(f"Could not download {where}: the repo has no revision {revision!r}.\n{err}") from err
    except RepositoryNotFoundError as err:
        raise OSError(f"Could not download {where}: no such repo (or no access to it).\n{err}") from err
    except LocalEntryNotFoundError as err:
        raise OSError(
            f"Could not load {where} from the local cache {_cache_root(cache_dir)!r} (offline or "
            f"`local_files_only=True`, or the Hub could not be reached).\n{err}"
        ) from err
    except ValueError:
        raise  # invalid repo id or arguments: already clear
    except Exception as err:  # HfHubHTTPError, a size mismatch (OSError), a broken connection...
        if local_files_only or not isinstance(err, (HfHubHTTPError, OSError)) or _is_connection_error(err):
            raise OSError(f"Could not download {where}.\n{err}") from err
        first = err
    try:
        folder = _redownload_missing(repo_id, allow_patterns, revision, cache_dir, **hub)
    except _FileDownloadError as failed:
        raise OSError(f"Could not download {failed.path!r} of {where}.\n{failed.error}") from failed.error
    if folder is None:
        raise OSError(f"Could not download {where}.\n{first}") from first
    return folder


def _is_connection_error(err: BaseException) -> bool:
    """True for httpx transport errors (connection refused or reset, timeouts, proxies): retrying is pointless."""
    return any(cls.__name__ in ("TransportError", "TimeoutException") for cls in type(err).__mro__)


def download_pipeline(
    repo_id: str,
    *,
    allow_pickle: bool = False,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """Download the safe files of a pipeline repo (:data:`PIPELINE_ALLOW_PATTERNS`; pickles only with
    ``allow_pickle=True``) and return the snapshot folder.

    A model component without safetensors weights raises: ``ValueError`` when the repo only has pickled weights
    (and ``allow_pickle`` is False), ``OSError`` when it has none. Other failures: see :func:`download_snapshot`.
    """
    patterns = PIPELINE_ALLOW_PATTERNS + (PICKLE_ALLOW_PATTERNS if allow_pickle else [])
    folder = download_snapshot(
        repo_id,
        patterns,
        what="DFM pipeline",
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    _check_component_weights(folder, repo_id, revision, cache_dir, allow_pickle)
    return folder


def _check_component_weights(
    folder: str, repo_id: str, revision: Optional[str], cache_dir: Optional[str], allow_pickle: bool
) -> None:
    """Raise if a model component of the downloaded pipeline (a folder with ``config.json``) has no weights."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return  # from_pretrained reports a missing or broken model_index.json
    if not isinstance(index, dict):
        return
    weights = (".safetensors",) + (PICKLE_SUFFIXES if allow_pickle else ())
    repo_files: Optional[list[str]] = None
    for component in sorted(k for k in index if not k.startswith("_")):
        sub = os.path.join(folder, component)
        if not os.path.isfile(os.path.join(sub, "config.json")):
            continue
        if any(f.endswith(weights) for f in os.listdir(sub)):
            continue
        if repo_files is None:
            repo_files = _cached_repo_files(repo_id, revision, cache_dir) or []
        pickles = [p for p in repo_files if p.startswith(f"{component}/") and p.endswith(PICKLE_SUFFIXES)]
        where = _where("DFM pipeline", repo_id, revision)
        if pickles and not allow_pickle:
            raise ValueError(
                f"{where}: {pickles[0]} is a pickle file and there are no safetensors weights for the {component!r} "
                "component; pickles can run code on load. Pass `allow_pickle=True` only for a source you trust."
            )
        raise OSError(f"{where} has no weights for its {component!r} component (expected {component}/*.safetensors).")
