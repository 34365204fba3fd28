"""Model cards of DFM pipelines and LoRA adapters (``huggingface_hub.ModelCard``, Jinja2 templates in
``dfm_hf/model_cards/``).

:func:`render_pipeline_card`, :func:`render_lora_card` and :func:`write_training_card` make cards; each card keeps the
values it was rendered from (an HTML comment at its end), so that a push to another repo, or a new preset, renders it
again (:func:`rerender_card`) unless someone edited it by hand.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Optional

from ..schedulers.presets import PRESET_SPECS, preset_names_in_folder

TAGS = ["discrete-flow-matching", "dfm_hf", "text-generation", "code"]

#: Arguments of a push that fill a fresh pipeline card.
CARD_KWARGS = ("training", "metrics", "datasets", "license", "limitations")
_DEFAULT_LIMITATIONS = "A small model: its samples are short-range plausible code, not reliable programs."

#: Known card templates (``dfm_hf/model_cards/*.md``, Jinja2, rendered by ``ModelCard.from_template``).
_TEMPLATES = ("pipeline_card.md", "lora_card.md")
#: Opens the HTML comment (invisible on the Hub) at the end of a card that holds the values it was rendered from.
_INPUTS_MARKER = "<!-- dfm_hf card inputs: "


def _template(name: str) -> str:
    return resources.files("dfm_hf").joinpath("model_cards", name).read_text(encoding="utf-8")


def _render(template: str, data: Any, values: dict[str, Any]) -> Any:
    """``ModelCard.from_template`` of ``template`` with metadata ``data`` and the template ``values``, which are
    stored (as JSON in an HTML comment) at the end of the card so that :func:`rerender_card` can render it again."""
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


def rerender_card(text: str, **changes: Any) -> Optional[str]:
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
    (Python code, e.g. ``dfm_hf.bundles.bundled_model_path()``, with ``load_import`` its import line) says otherwise.
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
    card = render_pipeline_card(name, training_args, metrics, preset_names=preset_names_in_folder(output_dir))
    path = os.path.join(output_dir, "README.md")
    tmp = path + ".tmp"
    card.save(tmp)
    os.replace(tmp, path)
    return path


def card_metadata(text: str) -> dict[str, Any]:
    """The YAML metadata of a card ({} if it has none or it does not parse)."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # an unparsable card is the user's: keep it untouched
        return {}


def is_pipeline_card(text: str) -> bool:
    """Whether ``text`` is a pipeline card rendered by :func:`render_pipeline_card`."""
    return card_metadata(text).get("library_name") == "dfm_hf"


def pipeline_card_text(pipe: Any, folder: str, repo_id: str, card: Any, options: dict[str, Any]) -> str:
    """The README.md to push with a pipeline folder (see :func:`dfm_hf.hub.push.push_pipeline_folder` for the
    order of choice)."""
    if card is not None:
        return str(card)
    presets = preset_names_in_folder(folder)
    if any(options.get(k) is not None for k in CARD_KWARGS):
        options = {k: v for k, v in options.items() if v is not None}
        return str(render_pipeline_card(repo_id, preset_names=presets, **options))
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None) if pipe is not None else None
    for candidate in (folder, source):
        if candidate and os.path.isfile(os.path.join(str(candidate), "README.md")):
            with open(os.path.join(str(candidate), "README.md"), encoding="utf-8") as f:
                text = f.read()
            if not is_pipeline_card(text):
                return text
            retargeted = rerender_card(
                text, repo_id=repo_id, load_expression=None, load_import=None, presets=preset_rows(presets)
            )
            return text if retargeted is None else retargeted
    return str(render_pipeline_card(repo_id, preset_names=presets))


def card_with_preset(text: str, name: str, description: str) -> Optional[str]:
    """``text`` (a card of ours) re-rendered with preset ``name`` added to (or replaced in) its presets table; None
    when it cannot be re-rendered (see :func:`rerender_card`)."""
    stored = _stored_inputs(text)
    if stored is None or stored[0] != "pipeline_card.md":
        return None
    presets = [(n, use) for n, use in stored[1].get("presets", []) if n != name]
    return rerender_card(text, presets=[*presets, (name, description)])
