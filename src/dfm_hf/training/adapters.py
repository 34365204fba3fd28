"""Adaptation of a pretrained model: the base a run starts from, LoRA on it, and the run's shippable ``adapter/``.

``--init_from_causal_lm`` converts a Llama / Mistral / Qwen2 causal LM with ``DFMPipeline.from_causal_lm`` (shifted
logits, a mask token); ``--init_from_pretrained`` loads a saved DFM pipeline or a released LLaDA / Dream model. With
``--lora_r`` the run trains a LoRA adapter (plus, after a conversion, the new mask token's embedding row) and saves,
next to the merged pipeline, an ``adapter/`` folder that rebuilds it on its own::

    adapter_config.json + adapter_model.safetensors   the LoRA adapter (peft's format)
    embedding_rows.safetensors                         ``token_ids`` and the trained embedding (and untied head) rows
    dfm_base.json                                      how to rebuild the base (``from_causal_lm`` arguments or a path)
    README.md                                          a card

:func:`load_adapted_pipeline` puts them together again. :func:`write_embedding_rows` is the one checked reader of an
``embedding_rows.safetensors`` (the default-model bundles ship the same file).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from typing import Any, Optional

import torch

from ..hub.download import ADAPTER_WEIGHTS

__all__ = [
    "ADAPTER_SUBFOLDER",
    "BASE_RECIPE_FILE",
    "DEFAULT_MASK_TOKEN",
    "EMBEDDING_ROWS_FILE",
    "LORA_TARGET_MODULES",
    "apply_lora",
    "base_recipe",
    "check_lora_targets",
    "init_source",
    "load_adapted_pipeline",
    "load_init_pipeline",
    "save_embedding_rows",
    "save_training_adapter",
    "set_block_size",
    "write_embedding_rows",
]

#: The projection layers of ``DFMForMaskedGeneration`` (attention and gated MLP), the default LoRA targets.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The folder of a LoRA run's adapter, inside ``--output_dir``.
ADAPTER_SUBFOLDER = "adapter"
#: Trained embedding rows: ``token_ids`` and the rows of ``model.embed_tokens.weight`` (and ``lm_head.weight``).
EMBEDDING_ROWS_FILE = "embedding_rows.safetensors"
#: How a run's ``adapter/`` folder says to rebuild its base (``init_from_causal_lm`` / ``init_from_pretrained``).
BASE_RECIPE_FILE = "dfm_base.json"
#: The mask token added to a converted causal LM's tokenizer unless ``--mask_token`` / ``--mask_token_id`` say.
DEFAULT_MASK_TOKEN = "<|mask|>"
_EMBED = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"


def init_source(args: argparse.Namespace) -> Optional[tuple[str, str]]:
    """``(flag, path)`` of ``--init_from_causal_lm`` / ``--init_from_pretrained``, or None (a random model)."""
    for flag in ("init_from_causal_lm", "init_from_pretrained"):
        if getattr(args, flag, None):
            return f"--{flag}", getattr(args, flag)
    return None


def load_init_pipeline(args: argparse.Namespace) -> Any:
    """The ``DFMPipeline`` of ``--init_from_causal_lm`` (converted) or ``--init_from_pretrained``; None without.

    Loading or conversion errors become ``ValueError`` naming the flag (nothing is written before)."""
    source = init_source(args)
    if source is None:
        return None
    from ..pipelines import DFMPipeline

    flag, path = source
    block_size = getattr(args, "block_size", None)
    try:
        if flag == "--init_from_causal_lm":
            kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
            pipe = DFMPipeline.from_causal_lm(
                path,
                mask_token=args.mask_token or DEFAULT_MASK_TOKEN,
                mask_token_id=args.mask_token_id,
                block_size=block_size,
                **kwargs,
            )
        else:
            pipe = DFMPipeline.from_pretrained(path)
            set_block_size(pipe.model, block_size)
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"`{flag}` {path!r}: {e}") from e
    if pipe.tokenizer is None:
        raise ValueError(f"`{flag}` {path!r} has no tokenizer.")
    return pipe


def set_block_size(model: torch.nn.Module, block_size: Optional[int]) -> None:
    """Make a loaded ``model`` a block-diffusion model with blocks of ``block_size`` positions (``config.block_size``;
    the weights do not change); ``None`` keeps the model's own."""
    if block_size is not None:
        model.config.block_size = block_size


def check_lora_targets(model: torch.nn.Module, targets: list[str], flag: str = "--lora_target_modules") -> None:
    """``ValueError`` naming ``flag`` when a name of ``targets`` is not a linear layer of ``model``."""
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [m for m in targets if m not in linear]
    if missing:
        raise ValueError(f"`{flag}` {missing} are not linear layers of the model; it has {sorted(linear)}.")


def apply_lora(
    model: torch.nn.Module, args: argparse.Namespace, trainable_token_indices: Optional[list[int]] = None
) -> Any:
    """``peft.get_peft_model`` with LoRA on ``--lora_target_modules`` (``--lora_r``, ``--lora_alpha``,
    ``--lora_dropout``) and, when given, the embedding rows ``trainable_token_indices`` trainable too (peft's
    trainable tokens: only those rows' deltas are trained and saved; a tied head shares them)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, args.lora_target_modules_list)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules_list),
        bias="none",
        trainable_token_indices=trainable_token_indices,
    )
    return get_peft_model(model, config)


def save_embedding_rows(
    path: str, token_ids: list[int], embed_rows: torch.Tensor, head_rows: Optional[torch.Tensor] = None
) -> None:
    """Write an ``embedding_rows.safetensors``: ``token_ids`` and the rows of the embedding (and, for an untied head,
    of ``lm_head.weight``) at those ids, as float32."""
    from safetensors.torch import save_file

    tensors = {"token_ids": torch.tensor(token_ids, dtype=torch.long), _EMBED: embed_rows.detach().float().cpu()}
    if head_rows is not None:
        tensors[_HEAD] = head_rows.detach().float().cpu()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def write_embedding_rows(model: torch.nn.Module, tensors: dict[str, torch.Tensor], folder: str) -> None:
    """Copy trained embedding (and untied head) rows into ``model`` at ``token_ids``: the contents of an
    ``embedding_rows.safetensors`` of ``folder`` (a bundle or a training run's ``adapter/``), checked first.

    Raises:
        ValueError: no 1-d ``token_ids``, no embedding rows, a tensor the model has no place for, or rows / ids that do
            not fit the model's tables (naming the file).
    """
    where = f"{folder}/{EMBEDDING_ROWS_FILE}"
    ids = tensors.get("token_ids")
    if ids is None or ids.dim() != 1:
        raise ValueError(f"{where} must hold a 1-d `token_ids` tensor")
    params = dict(model.named_parameters())
    allowed = {_EMBED} | ({_HEAD} if _HEAD in params else set())
    unknown = sorted(set(tensors) - allowed - {"token_ids"})
    if unknown:
        raise ValueError(f"{where}: tensors {unknown} have no place in the model; accepted: {sorted(allowed)}")
    if _EMBED not in tensors:
        raise ValueError(f"{where} lacks `{_EMBED}`")
    with torch.no_grad():
        for name in sorted(set(tensors) - {"token_ids"}):
            weight, rows = params[name], tensors[name]
            if rows.shape != (ids.shape[0], weight.shape[1]) or int(ids.max()) >= weight.shape[0] or int(ids.min()) < 0:
                raise ValueError(
                    f"{where}: `{name}` rows {tuple(rows.shape)} at ids {ids.tolist()} do not fit the "
                    f"model's {tuple(weight.shape)}"
                )
            weight[ids.long()] = rows.to(weight.dtype)


def base_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """What ``dfm_base.json`` records: the ``from_causal_lm`` arguments of the run, or its pretrained path (and
    ``block_size`` when ``--block_size`` set it)."""
    flag, source = init_source(args)
    block = {"block_size": args.block_size} if getattr(args, "block_size", None) is not None else {}
    if getattr(args, "fim_rate", 0.0):
        block["fim_tokens"] = True  # the pipeline declares FIM tokens (pipelines.fim.add_fim_tokens)
    if flag != "--init_from_causal_lm":
        return {"init_from_pretrained": source, **block}
    reused = args.mask_token_id is not None  # an existing token is the mask: no new token string
    mask_token = None if reused else (args.mask_token or DEFAULT_MASK_TOKEN)
    return {"init_from_causal_lm": source, "gguf_file": args.gguf_file, "mask_token": mask_token,
            "mask_token_id": args.mask_token_id, **block}  # fmt: skip


def save_training_adapter(peft_model: Any, args: argparse.Namespace, final: dict[str, Any]) -> str:
    """``<output_dir>/adapter`` (see the module docstring), written into a temp folder, then renamed; returns it.

    The LoRA weights are peft's state dict without the trainable-token deltas; those (the mask row, with
    ``--init_from_causal_lm``) go to ``embedding_rows.safetensors`` instead, with an untied head's rows as they are.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ..hub import render_lora_card

    path = os.path.join(args.output_dir, ADAPTER_SUBFOLDER)
    tmp = os.path.join(args.output_dir, f".tmp-{ADAPTER_SUBFOLDER}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    recipe = base_recipe(args)
    source = init_source(args)[1]
    (name, config), *_ = peft_model.peft_config.items()
    state = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
    rows = {k: v for k, v in state.items() if "trainable_tokens_delta" in k}
    lora = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in rows}
    save_file(lora, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    lora_config = copy.deepcopy(config)
    lora_config.trainable_token_indices = None  # the rows travel in embedding_rows.safetensors
    lora_config.base_model_name_or_path = source
    lora_config.inference_mode = True
    lora_config.save_pretrained(tmp)
    if rows:
        (_, values), *more = rows.items()
        if more:
            raise ValueError(f"expected one trained embedding table, got {sorted(rows)}")
        ids = list(config.trainable_token_indices)
        inner = peft_model.get_base_model()
        head = None if inner.config.tie_word_embeddings else inner.lm_head.weight[torch.tensor(ids)]
        save_embedding_rows(os.path.join(tmp, EMBEDDING_ROWS_FILE), ids, values, head)
    with open(os.path.join(tmp, BASE_RECIPE_FILE), "w", encoding="utf-8") as f:
        json.dump(recipe, f, indent=2)
    skip = ("coupling_spec", "model_config_fields", "lora_target_modules_list")
    training = {k: v for k, v in vars(args).items() if k not in skip}
    repo = os.path.basename(os.path.abspath(args.output_dir)) + "-lora"
    render_lora_card(repo, base_model=source, training={**training, **final}).save(os.path.join(tmp, "README.md"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def load_adapted_pipeline(adapter_dir: str, fuse: bool = True) -> Any:
    """The pipeline of a training run's ``adapter/`` folder (:func:`save_training_adapter`): the base rebuilt from
    ``dfm_base.json``, the trained embedding rows written into it, the LoRA adapter loaded (and fused unless
    ``fuse=False``). The scheduler is the base's default.

    Raises:
        ValueError: ``adapter_dir`` has no ``dfm_base.json``, or its embedding rows do not fit the base.
    """
    from safetensors.torch import load_file

    from ..pipelines import DFMPipeline
    from ..pipelines.fim import add_fim_tokens

    recipe_file = os.path.join(adapter_dir, BASE_RECIPE_FILE)
    if not os.path.isfile(recipe_file):
        raise ValueError(f"`adapter_dir` {adapter_dir!r} has no {BASE_RECIPE_FILE}: not an adapter of train_dfm.py.")
    with open(recipe_file, encoding="utf-8") as f:
        recipe = json.load(f)
    if "init_from_causal_lm" in recipe:
        kwargs = {"gguf_file": recipe["gguf_file"]} if recipe.get("gguf_file") else {}
        mask_token = recipe.get("mask_token") or DEFAULT_MASK_TOKEN
        pipe = DFMPipeline.from_causal_lm(
            recipe["init_from_causal_lm"],
            mask_token=mask_token,
            mask_token_id=recipe.get("mask_token_id"),
            block_size=recipe.get("block_size"),
            **kwargs,
        )
    else:
        pipe = DFMPipeline.from_pretrained(recipe["init_from_pretrained"])
        set_block_size(pipe.model, recipe.get("block_size"))
    if recipe.get("fim_tokens"):
        add_fim_tokens(pipe)
    pipe.model.to(torch.float32)
    rows_file = os.path.join(adapter_dir, EMBEDDING_ROWS_FILE)
    if os.path.isfile(rows_file):
        write_embedding_rows(pipe.model, load_file(rows_file), adapter_dir)
    pipe.load_lora_weights(adapter_dir)
    if fuse:
        pipe.fuse_lora()
    return pipe
