"""Hub helpers: model cards for pipelines and LoRA adapters, preset listing, pushing a saved pipeline folder."""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Optional

from .pipelines.presets import PRESET_SPECS, PRESETS_DIR

TAGS = ["discrete-flow-matching", "dfm_hf", "text-generation", "code"]


def _template(name: str) -> str:
    return resources.files("dfm_hf").joinpath("model_cards", name).read_text(encoding="utf-8")


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{{ " + key + " }}", value)
    return template


def presets_table(names: Optional[list[str]] = None) -> str:
    """Markdown rows ``| name | use |`` of the shipped scheduler presets."""
    names = names or list(PRESET_SPECS)
    return "\n".join(f"| `{n}` | {PRESET_SPECS[n][2] if n in PRESET_SPECS else 'custom preset'} |" for n in names)


def render_pipeline_card(
    repo_id: str,
    training: Optional[dict[str, Any]] = None,
    metrics: Optional[dict[str, Any]] = None,
    license: str = "apache-2.0",
    datasets: Optional[list[str]] = None,
    limitations: str = "A small model: its samples are short-range plausible code, not reliable programs.",
    preset_names: Optional[list[str]] = None,
    evaluation_section: Optional[str] = None,
) -> Any:
    """A ``huggingface_hub.ModelCard`` for a DFM pipeline: YAML metadata, usage, presets, training, metrics."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    eval_results = None
    if metrics and "val_loss" in metrics:
        eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type="held-out",
                dataset_name="held-out validation files",
                metric_type=name,
                metric_value=float(metrics[name]),
            )
            for name in ("val_loss", "ppl_bound")
            if name in metrics
        ]
    data = ModelCardData(
        library_name="dfm_hf",
        tags=TAGS,
        pipeline_tag="text-generation",
        license=license,
        datasets=datasets,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results,
    )
    training_section = "Not recorded."
    if training:
        shown = {k: v for k, v in training.items() if not k.startswith("_") and k != "coupling_spec"}
        training_section = "```json\n" + json.dumps(shown, indent=2, default=str) + "\n```"
    if evaluation_section is None:
        evaluation_section = "Not measured."
        if metrics:
            rows = [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))]
            evaluation_section = "| metric | value |\n|---|---|\n" + "\n".join(rows)
            if metrics.get("samples"):
                evaluation_section += "\n\nSamples:\n\n" + "\n\n".join(
                    "```python\n" + s + "\n```" for s in metrics["samples"]
                )
    text = _fill(
        _template("pipeline_card.md"),
        {
            "card_data": data.to_yaml(),
            "model_name": repo_id.split("/")[-1],
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
    card = render_pipeline_card(os.path.basename(os.path.abspath(output_dir)), training_args, metrics)
    path = os.path.join(output_dir, "README.md")
    tmp = path + ".tmp"
    card.save(tmp)
    os.replace(tmp, path)
    return path


def list_scheduler_presets(path_or_repo: str, revision: Optional[str] = None, token: Optional[str] = None) -> list[str]:
    """Names of the scheduler presets stored in a pipeline folder or Hub repo."""
    if os.path.isdir(path_or_repo):
        root = os.path.join(path_or_repo, PRESETS_DIR)
        return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "scheduler_config.json")))
    from huggingface_hub import HfApi

    files = HfApi(token=token).list_repo_files(path_or_repo, revision=revision)
    return sorted(
        {f.split("/")[1] for f in files if f.startswith(PRESETS_DIR + "/") and f.endswith("/scheduler_config.json")}
    )


def push_pipeline_folder(pipe: Any, folder: str, repo_id: Optional[str] = None, **kwargs: Any) -> Any:
    """Upload a saved pipeline folder to ``repo_id`` (created if needed) with our model card."""
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("`repo_id` is required to push a pipeline.")
    api = HfApi(token=kwargs.get("token"))
    api.create_repo(repo_id, private=kwargs.get("private"), exist_ok=True)
    if not os.path.isfile(os.path.join(folder, "README.md")):
        render_pipeline_card(repo_id, preset_names=sorted(pipe.scheduler_presets)).save(
            os.path.join(folder, "README.md")
        )
    if kwargs.get("revision") and kwargs["revision"] != "main":
        api.create_branch(repo_id, branch=kwargs["revision"], exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=kwargs.get("revision"),
        commit_message=kwargs.get("commit_message", "Upload DFMPipeline"),
    )


def push_pipeline_to_hub(pipe: Any, repo_id: str, **kwargs: Any) -> Any:
    """``pipe.save_pretrained`` into a temp folder, then :func:`push_pipeline_folder` it to ``repo_id``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        return push_pipeline_folder(pipe, tmp, repo_id=repo_id, **kwargs)
