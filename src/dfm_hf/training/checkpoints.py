"""Checkpoints of a run: saved atomically, resumed only when they fit the run.

``<output_dir>/checkpoints/checkpoint-<step>`` holds accelerate's state (model, optimizer, schedule, every process's
RNG) and ``training_state.json``: the step, the model config's shape signature, the tokenizer's vocabulary hash and
the training recipe (the flags a resumed run must share). A checkpoint is written into a ``.tmp-`` folder and renamed,
so a killed run never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from typing import Any, Optional

__all__ = [
    "STATE_FILE",
    "checkpoint_dirs",
    "config_signature",
    "read_checkpoint_step",
    "resolve_resume",
    "save_checkpoint",
    "tokenizer_fingerprint",
    "training_recipe",
]

#: The file that marks a complete checkpoint.
STATE_FILE = "training_state.json"


def checkpoint_dirs(output_dir: str) -> list[str]:
    """The complete checkpoints of ``output_dir`` (those holding ``training_state.json``), oldest step first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    dirs = [d for d in os.listdir(root) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    dirs = [d for d in dirs if os.path.isfile(os.path.join(root, d, STATE_FILE))]  # complete ones only
    return [os.path.join(root, d) for d in sorted(dirs, key=lambda d: int(d.split("-")[-1]))]


def resolve_resume(args: argparse.Namespace, config: Any, tokenizer: Any) -> Optional[str]:
    """The checkpoint ``--resume_from_checkpoint`` names (``latest``: the last complete one, None when there is none).

    Raises:
        ValueError: naming ``--resume_from_checkpoint`` when the checkpoint is incomplete or was written for another
            model config, tokenizer vocabulary or training recipe (:func:`training_recipe`).
    """
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        dirs = checkpoint_dirs(args.output_dir)
        if not dirs:
            return None
        path = dirs[-1]
    else:
        path = args.resume_from_checkpoint
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise ValueError(f"`--resume_from_checkpoint` {path!r} is incomplete (no training_state.json).")
    with open(state_file, encoding="utf-8") as f:
        state = json.load(f)
    saved, current = state.get("model_config", {}), config_signature(config)
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        raise ValueError(
            f"`--resume_from_checkpoint` {path!r} was written for a different model config (differs in {diff})."
        )
    if state.get("tokenizer_sha256", tokenizer_fingerprint(tokenizer)) != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"`--resume_from_checkpoint` {path!r} was written with a different tokenizer vocabulary (other data or "
            "`--tokenizer_name_or_path`?)."
        )
    saved_recipe, recipe = state.get("recipe"), training_recipe(args)
    if saved_recipe is not None:
        diff = sorted(k for k in set(saved_recipe) | set(recipe) if saved_recipe.get(k) != recipe.get(k))
        if diff:
            flags = ", ".join(f"--{k}={saved_recipe.get(k)!r}" for k in diff)
            raise ValueError(
                f"`--resume_from_checkpoint` {path!r} was written with other training flags ({flags}): resume with "
                "the same ones (the annealing schedule, loss weighting and LoRA layout are part of the run's state)."
            )
    return path


def training_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a resumed run must share with the checkpoint it resumes (stored in ``training_state.json``)."""
    return {
        "attention_annealing_steps": getattr(args, "attention_annealing_steps", 0),
        "loss_weighting": getattr(args, "loss_weighting", "none"),
        "lora_r": getattr(args, "lora_r", 0),
        "lora_alpha": getattr(args, "lora_alpha", None) if getattr(args, "lora_r", 0) else None,
        "lora_target_modules": sorted(getattr(args, "lora_target_modules_list", []))
        if getattr(args, "lora_r", 0)
        else None,
        "sft": bool(getattr(args, "sft", False)),
        **({"complementary_masks": True} if getattr(args, "complementary_masks", False) else {}),
        **({"fim_rate": args.fim_rate} if getattr(args, "fim_rate", 0.0) else {}),
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, sorted)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def config_signature(config: Any) -> dict[str, Any]:
    """The model config values a checkpoint's weights depend on (shapes, time conditioning, the mask id, the block
    size of a block-diffusion model)."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    keys += ("max_position_embeddings", "time_conditioning", "mask_token_id")
    signature = {k: getattr(config, k) for k in keys}
    if getattr(config, "block_size", None) is not None:  # the attention pattern the weights were trained under
        signature["block_size"] = config.block_size
    return signature


def save_checkpoint(accelerator: Any, args: argparse.Namespace, step: int, config: Any, tokenizer: Any) -> None:
    """``save_state`` into a temp folder, then rename: a killed run never leaves a half-written checkpoint behind."""
    root = os.path.join(args.output_dir, "checkpoints")
    final = os.path.join(root, f"checkpoint-{step}")
    tmp = os.path.join(root, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            state = {"step": step, "model_config": config_signature(config), "recipe": training_recipe(args)}
            json.dump({**state, "tokenizer_sha256": tokenizer_fingerprint(tokenizer)}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(args.output_dir)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_checkpoint_step(path: str) -> int:
    """The optimizer step a checkpoint was written at."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return int(json.load(f)["step"])
