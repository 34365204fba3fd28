"""Pushing DFM pipelines, scheduler presets and LoRA adapters to the Hugging Face Hub, each in a single commit.

:func:`push_pipeline_to_hub` (what ``DFMPipeline.push_to_hub`` runs), :func:`push_pipeline_folder`,
:func:`push_scheduler_preset`, :func:`push_lora_adapter`; :func:`list_scheduler_presets` of a folder or a Hub repo.
The cards pushed come from :mod:`dfm_hf.hub.cards`.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

from ..schedulers.presets import PRESET_CLASSES, PRESETS_DIR, check_preset_name, preset_names_in_folder
from .cards import (
    card_metadata,
    card_with_preset,
    is_pipeline_card,
    pipeline_card_text,
    render_lora_card,
    rerender_card,
)
from .download import ADAPTER_CONFIG, ADAPTER_WEIGHTS, local_adapter_files

#: Never uploaded from a pipeline folder: training checkpoints and temporary files.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", ".tmp-*", "*.incomplete", "*.tmp", ".git/*", ".cache/*", "__pycache__/*"]
_SAVE_KWARGS = ("safe_serialization", "variant", "max_shard_size")


def _prepare_branch(api: Any, repo_id: str, revision: Optional[str]) -> None:
    """Create branch ``revision`` (from the default branch) if it is not the default branch and does not exist."""
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)


def list_scheduler_presets(path_or_repo: str, revision: Optional[str] = None, token: Optional[str] = None) -> list[str]:
    """Names of the scheduler presets stored in a pipeline folder or Hub repo (sorted; empty if none)."""
    if os.path.isdir(path_or_repo):
        return preset_names_in_folder(path_or_repo)
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
    ``card`` (a ``ModelCard`` or text); a fresh :func:`~dfm_hf.hub.cards.render_pipeline_card` when any of
    ``training``, ``metrics``, ``datasets``, ``license``, ``limitations`` is given; the folder's own ``README.md``
    (e.g. written by training); the ``README.md`` of the local folder ``pipe`` was loaded from; a fresh card. A kept
    dfm_hf card is rendered again from the values stored in it, for ``repo_id`` and the folder's presets (a card
    edited by hand is pushed as it is). ``save_kwargs`` (``safe_serialization``, ``variant``, ``max_shard_size``) are
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
    readme = pipeline_card_text(pipe, folder, repo_id, card, options)

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

    ``revision`` pushes to that branch (created from ``main`` if needed). When the repo's ``README.md`` is a dfm_hf
    card (not edited by hand), it is rendered again with the preset's row (``description``, default "custom <class>
    preset") in its presets table, in the same commit. Pipelines pulled afterwards list the preset
    (``pipe.load_scheduler_preset(name)``); it also loads with
    ``Scheduler.from_pretrained(repo_id, subfolder=f"scheduler_presets/{name}")``. Returns the ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import EntryNotFoundError

    check_preset_name(name)
    if type(scheduler) not in PRESET_CLASSES.values():
        raise ValueError(
            f"`scheduler` must be one of {sorted(PRESET_CLASSES)} (pipelines load no other preset class), "
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
    if readme is not None and is_pipeline_card(readme):
        updated = card_with_preset(readme, name, description or f"custom `{type(scheduler).__name__}` preset")
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
    ``README.md`` when :func:`~dfm_hf.hub.cards.render_lora_card` wrote it for the same base model (e.g. LoRA
    fine-tuning did; it is rendered again for ``repo_id`` and ``adapter_name`` unless edited by hand) and ``training``
    is None; otherwise a fresh one (``training`` goes in it, default: the LoRA hyper-parameters; peft's own template
    card is replaced).
    The repo is created if needed; ``revision`` pushes to that branch. Returns the ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

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
        data = card_metadata(text)
        if "dfm_hf" in (data.get("tags") or []) and data.get("base_model") == base_model:
            card = rerender_card(text, repo_id=repo_id, adapter_name=adapter_name)
            if card is None:  # edited by hand, or holding no stored values: pushed as it is
                card = text
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
