"""Sharing DFM pipelines, scheduler presets and LoRA adapters on the Hugging Face Hub.

- Model cards: :func:`render_pipeline_card`, :func:`render_lora_card`, :func:`write_training_card`.
- Pushing: :func:`push_pipeline_to_hub` (what ``DFMPipeline.push_to_hub`` runs), :func:`push_pipeline_folder`,
  :func:`push_scheduler_preset`, :func:`push_lora_adapter`. Each push is a single commit.
- Pulling (defined in :mod:`dfm_hf.hub.download`, re-exported here): :func:`download_pipeline` /
  :func:`download_snapshot` (what ``DFMPipeline.download`` and ``load_lora_weights`` run): ``snapshot_download`` of
  safe files only, with errors that name the repo and the file.
- :func:`list_scheduler_presets` of a folder or a Hub repo.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from typing import Any, Optional

from ..pipelines.presets import _PRESET_CLASSES, PRESET_SPECS, PRESETS_DIR
from .download import (  # noqa: F401 - re-exported: dfm_hf.hub is the public home of the Hub helpers
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_ALLOW_PATTERNS,
    PICKLE_SUFFIXES,
    PIPELINE_ALLOW_PATTERNS,
    download_pipeline,
    download_snapshot,
    local_adapter_files,
)

TAGS = ["discrete-flow-matching", "dfm_hf", "text-generation", "code"]

#: Never uploaded from a pipeline folder: training checkpoints and temporary files.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", ".tmp-*", "*.incomplete", "*.tmp", ".git/*", ".cache/*", "__pycache__/*"]
_SAVE_KWARGS = ("safe_serialization", "variant", "max_shard_size")
_CARD_KWARGS = ("training", "metrics", "datasets", "license", "limitations")
_DEFAULT_LIMITATIONS = "A small model: its samples are short-range plausible code, not reliable programs."

# --------------------------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------------------------

#: Known card templates (``dfm_hf/model_cards/*.md``, Jinja2, rendered by ``ModelCard.from_template``).
_TEMPLATES = ("pipeline_card.md", "lora_card.md")
#: Opens the HTML comment (invisible on the Hub) at the end of a card that holds the values it was rendered from.
_INPUTS_MARKER = "<!-- dfm_hf card inputs: "


def _template(name: str) -> str:
    return resources.files("dfm_hf").joinpath("model_cards", name).read_text(encoding="utf-8")


def _render(template: str, data: Any, values: dict[str, Any]) -> Any:
    """``ModelCard.from_template`` of ``template`` with metadata ``data`` and the template ``values``, which are
    stored (as JSON in an HTML comment) at the end of the card so that :func:`_rerender` can render it again."""
    from huggingface_hub import ModelCard

    text = str(ModelCard.from_template(data, template_str=_template(template), **values)).rstrip("\n")
    # ">" only occurs inside JSON strings: escaping it keeps any "-->" in a value from closing the comment
    payload = json.dumps({"template": template, "values": values}, sort_keys=True).replace(">", "\\u003e")
    return ModelCard(f"{text}\n\n{_INPUTS_MARKER}{payload} -->\n")


def _stored_inputs(text: str) -> Optional[tuple[str, dict[str, Any]]]:
    """``(template, values)`` stored in a card by :func:`_render`, or None (not rendered by us, or unreadable)."""
    start = text.rfind(_INPUTS_MARKER)
    end = text.find(" -->", start)
    if start < 0 or end < 0:
        return None
    try:
        stored = json.loads(text[start + len(_INPUTS_MARKER) : end])
    except ValueError:
        return None
    if not isinstance(stored, dict) or stored.get("template") not in _TEMPLATES:
        return None
    values = stored.get("values")
    return (stored["template"], values) if isinstance(values, dict) else None


def _rerender(text: str, **changes: Any) -> Optional[str]:
    """``text`` rendered again from its stored values updated with ``changes`` (and its own metadata), or None when
    ``text`` has no stored values or was edited after it was rendered (a card someone edited is never rewritten)."""
    from huggingface_hub import ModelCard

    stored = _stored_inputs(text)
    if stored is None:
        return None
    template, values = stored
    try:
        data = ModelCard(text).data
        if str(_render(template, data, values)).rstrip() != text.rstrip():
            return None
        return str(_render(template, data, {**values, **changes}))
    except Exception:  # unparsable metadata or values the template cannot take: keep the card as it is
        return None


def preset_rows(names: Optional[list[str]] = None) -> list[tuple[str, str]]:
    """``(name, what it is good for)`` of the presets ``names`` (default: the shipped ones), in order."""
    names = list(PRESET_SPECS) if names is None else names
    return [(n, PRESET_SPECS[n][2] if n in PRESET_SPECS else "custom preset") for n in names]


def render_pipeline_card(
    repo_id: str,
    training: Optional[dict[str, Any]] = None,
    metrics: Optional[dict[str, Any]] = None,
    license: str = "apache-2.0",
    datasets: Optional[list[str]] = None,
    limitations: str = _DEFAULT_LIMITATIONS,
    preset_names: Optional[list[str]] = None,
    evaluation_section: Optional[str] = None,
    *,
    training_section: Optional[str] = None,
    load_expression: Optional[str] = None,
    load_import: Optional[str] = None,
) -> Any:
    """A ``huggingface_hub.ModelCard`` for a DFM pipeline: YAML metadata, usage, presets, training, metrics.

    The metadata holds ``library_name: dfm_hf``, the tags, ``pipeline_tag``, ``license``, ``datasets`` (when given)
    and a ``model-index`` with one result per numeric entry of ``metrics`` (when given). The body is the template
    ``dfm_hf/model_cards/pipeline_card.md``; ``training_section`` / ``evaluation_section`` (markdown) replace the
    sections made from ``training`` / ``metrics``; the usage snippet loads ``repo_id`` unless ``load_expression``
    (Python code, e.g. ``dfm_hf.cli.bundled_model_path()``, with ``load_import`` its import line) says otherwise.
    The values the body was rendered from are kept in the card, so pushing it elsewhere re-renders it.
    """
    from huggingface_hub import EvalResult, ModelCardData

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
    if training_section is None:
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
    values = {
        "model_name": model_name,
        "repo_id": repo_id,
        "load_expression": load_expression,
        "load_import": load_import,
        "presets": preset_rows(preset_names),
        "training_section": training_section,
        "evaluation_section": evaluation_section,
        "limitations": limitations,
    }
    return _render("pipeline_card.md", data, values)


def render_lora_card(
    repo_id: str, base_model: str, adapter_name: str = "default", training: Optional[dict[str, Any]] = None
) -> Any:
    """A ``ModelCard`` for a LoRA adapter repo that names its base model (``base_model`` metadata)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="peft", tags=TAGS + ["lora"], base_model=base_model, pipeline_tag="text-generation"
    )
    values = {
        "model_name": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "base_model": base_model,
        "adapter_name": adapter_name,
        "training_section": "```json\n" + json.dumps(training or {}, indent=2, default=str) + "\n```",
        "limitations": "Inherits the base model's limitations; trained on a small corpus.",
    }
    return _render("lora_card.md", data, values)


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
            if not _is_our_card(text):
                return text
            retargeted = _rerender(
                text, repo_id=repo_id, load_expression=None, load_import=None, presets=preset_rows(presets)
            )
            return text if retargeted is None else retargeted
    return str(render_pipeline_card(repo_id, preset_names=presets))


def _with_preset(text: str, name: str, description: str) -> Optional[str]:
    """``text`` (a card of ours) re-rendered with preset ``name`` added to (or replaced in) its presets table; None
    when it cannot be re-rendered (see :func:`_rerender`)."""
    stored = _stored_inputs(text)
    if stored is None or stored[0] != "pipeline_card.md":
        return None
    presets = [(n, use) for n, use in stored[1].get("presets", []) if n != name]
    return _rerender(text, presets=[*presets, (name, description)])


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
    the ``README.md`` of the local folder ``pipe`` was loaded from; a fresh card. A kept dfm_hf card is rendered
    again from the values stored in it, for ``repo_id`` and the folder's presets (a card edited by hand is pushed as
    it is). ``save_kwargs`` (``safe_serialization``, ``variant``, ``max_shard_size``) are
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

    ``revision`` pushes to that branch (created from ``main`` if needed). When the repo's ``README.md`` is a dfm_hf
    card (not edited by hand), it is rendered again with the preset's row (``description``, default "custom <class>
    preset") in its presets table, in the same commit. Pipelines pulled afterwards list the preset
    (``pipe.load_scheduler_preset(name)``); it also loads with
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
        updated = _with_preset(readme, name, description or f"custom `{type(scheduler).__name__}` preset")
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
    ``README.md`` when :func:`render_lora_card` wrote it for the same base model (e.g. LoRA fine-tuning did; it is
    rendered again for ``repo_id`` and ``adapter_name`` unless edited by hand) and ``training`` is None; otherwise a
    fresh one (``training`` goes in it, default: the LoRA hyper-parameters; peft's own template card is replaced).
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
        data = _card_data(text)
        if "dfm_hf" in (data.get("tags") or []) and data.get("base_model") == base_model:
            card = _rerender(text, repo_id=repo_id, adapter_name=adapter_name)
            if card is None:  # edited by hand (or rendered before cards kept their values): pushed as it is
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
