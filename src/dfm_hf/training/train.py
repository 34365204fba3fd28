"""Train a DFM model with accelerate: ``python examples/train_dfm.py ...`` or ``dfm-hf train ...``.

Read it top to bottom: arguments -> checks (before anything is written) -> data -> tokenizer -> model, scheduler and
collator -> resume -> loop (accumulate, clip, step, log, evaluate, checkpoint) -> save a full DFMPipeline + card.

Batches are a pure function of (seed, step, micro-step, rank): process ``r`` of ``W`` at micro-step ``m`` of
optimizer step ``s`` reads rows ``((s * A + m) * W + r) * B ...`` of the epoch's permutation, and its corruption
(t, couplings, x_t) is drawn from a generator seeded by the same global index. So two processes with accumulation A
see exactly the global batch one process sees with accumulation 2A, and a resumed run continues with the very
batches the uninterrupted run would have used.

Adaptation (``--init_from_causal_lm``): a Llama / Mistral / Qwen2 causal LM converted by
``DFMPipeline.from_causal_lm`` (shifted logits, a mask token), trained with DiffuLLaMA's attention annealing
(``--attention_annealing_steps``: the attention mask of each micro-batch is drawn from a generator seeded by the same
global index, so a resumed run uses the very masks the uninterrupted run would), the ``1/t``-weighted masked CE
(``--loss_weighting inverse_t``), full fine-tuning or LoRA (``--lora_r``, plus the mask embedding row). With LoRA the
output folder holds the merged ``DFMPipeline`` and ``adapter/`` (the LoRA adapter, the trained mask row and how to
rebuild the base: shippable on its own, see :func:`save_training_adapter` / :func:`load_adapted_pipeline`).
``--init_from_pretrained`` starts from a saved DFM pipeline or a released LLaDA / Dream model instead; ``--sft``
reads prompt/completion or chat data (the prompt conditions, only the response and its EOS are scored).

Two CPU processes: ``torchrun --nproc_per_node 2 examples/train_dfm.py ...`` (or ``accelerate launch --multi_gpu``;
on a CPU-only machine ``accelerate launch --num_processes 2``, with or without ``--cpu``, starts ONE process). The
first line of ``logs/metrics.jsonl`` (``"event": "start"``) records the real group size and backend.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Optional

import torch

# adapter files as in bundles; load_adapted_pipeline (a run's adapter/ -> its pipeline) is re-exported from here
from ..default_model import BASE_RECIPE_FILE, EMBEDDING_ROWS_FILE, load_adapted_pipeline  # noqa: F401
from ..hub.download import ADAPTER_WEIGHTS as ADAPTER_WEIGHTS_FILE
from ..models.configuration_dfm import LOSS_TYPES as LOSSES
from ..paths import COUPLINGS, PREDICTION_TYPES
from .losses import LOSS_WEIGHTINGS

#: The projection layers of ``DFMForMaskedGeneration`` (attention and gated MLP), the default LoRA targets.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_SUBFOLDER = "adapter"
#: Written next to the adapter: how to rebuild the base model it applies to.
DEFAULT_MODEL_CONFIG = "tiny"
DEFAULT_TOKENIZER_VOCAB_SIZE = 8192
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
_TOKEN_IDS = ("vocab_size", "mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id")


def build_parser() -> argparse.ArgumentParser:
    """The training flags (diffusers example-script style)."""
    p = argparse.ArgumentParser(description="Train a Discrete Flow Matching model.")
    add_data_arguments(p)
    t = p.add_argument_group("tokenizer and model")
    t.add_argument("--tokenizer_name_or_path", default=None, help="a tokenizer folder; default: train a BPE")
    t.add_argument("--tokenizer_vocab_size", type=int, default=None, help="size of the trained BPE (default 8192)")
    t.add_argument(
        "--model_config", default=None, help="DFMConfig json path or preset name (tiny/small/base; default tiny)"
    )
    t.add_argument("--model_config_overrides", default=None, help="json, e.g. '{\"num_hidden_layers\": 4}'")
    t.add_argument("--scheduler_config", default=None, help="scheduler_config.json (kappa schedule, source)")
    t.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None)
    add_adaptation_arguments(p)
    o = add_optimisation_arguments(p)
    o.add_argument("--max_train_minutes", type=float, default=None, help="stop (and save) after this wall time")
    c = add_logging_arguments(p)
    c.add_argument("--checkpointing_steps", type=int, default=500)
    c.add_argument("--checkpoints_total_limit", type=int, default=2)
    c.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    return p


def add_adaptation_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Starting from a causal LM or a DFM model: conversion, attention annealing, LoRA (``train.py`` only)."""
    a = p.add_argument_group("adaptation: start from a pretrained model instead of a random one")
    a.add_argument(
        "--init_from_causal_lm",
        default=None,
        metavar="PATH",
        help="a Llama / Mistral / Qwen2 causal LM (folder or Hub id) converted by DFMPipeline.from_causal_lm; "
        "its tokenizer (with the mask token) is used, --model_config / tokenizer flags are refused",
    )
    a.add_argument("--gguf_file", default=None, help="a GGUF file of --init_from_causal_lm (read dequantized)")
    a.add_argument("--mask_token", default=None, help="mask token added to the causal LM's tokenizer (<|mask|>)")
    a.add_argument("--mask_token_id", type=int, default=None, help="reuse this existing token id as the mask")
    a.add_argument(
        "--init_from_pretrained",
        default=None,
        metavar="PATH",
        help="a saved DFMPipeline or a released LLaDA / Dream / DiffuCoder model (folder or Hub id)",
    )
    a.add_argument(
        "--attention_annealing_steps",
        type=int,
        default=0,
        help="at step s each query sees each future key with probability min(1, s/N): causal at 0, "
        "bidirectional from N on; 0 = bidirectional at once (evaluation always is)",
    )
    a.add_argument("--lora_r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    a.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default 2 * --lora_r)")
    a.add_argument("--lora_dropout", type=float, default=0.0)
    a.add_argument("--lora_target_modules", default=",".join(LORA_TARGET_MODULES), help="comma-separated layer names")
    return a


def add_data_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The data flags (shared by the training and fine-tuning scripts)."""
    d = p.add_argument_group("data")
    d.add_argument("--train_file", nargs="+", default=None, help="text/json/jsonl/parquet files or directories")
    d.add_argument("--stdlib", action="store_true", help="train on this interpreter's standard library sources")
    d.add_argument("--validation_file", nargs="+", default=None)
    d.add_argument("--validation_fraction", type=float, default=0.05, help="held-out share of files (--stdlib)")
    d.add_argument("--text_column", default="text")
    d.add_argument("--seq_len", type=int, default=256)
    d.add_argument("--streaming", action="store_true", help="stream and pack large inputs lazily")
    d.add_argument(
        "--sft",
        action="store_true",
        help="supervised fine-tuning data (json/jsonl/parquet): prompt/completion or chat messages; the "
        "prompt conditions, only the response + EOS is corrupted and scored; one example per row",
    )
    d.add_argument("--prompt_column", default="prompt")
    d.add_argument("--completion_column", default="completion")
    d.add_argument(
        "--messages_column", default="messages", help="chat turns [{role, content}] (the tokenizer's template)"
    )
    return d


def add_optimisation_arguments(
    p: argparse.ArgumentParser, learning_rate: float = 1e-3, warmup_steps: int = 100, max_train_steps: int = 1000
) -> argparse._ArgumentGroup:
    """The optimisation flags (shared); the defaults given here differ between training and fine-tuning."""
    o = p.add_argument_group("optimisation")
    o.add_argument("--output_dir", required=True)
    o.add_argument("--max_train_steps", type=int, default=max_train_steps)
    o.add_argument("--train_batch_size", type=int, default=16, help="per process, per micro-step")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1)
    o.add_argument("--learning_rate", type=float, default=learning_rate)
    o.add_argument("--weight_decay", type=float, default=0.01)
    o.add_argument("--lr_scheduler", default="cosine", choices=LR_SCHEDULERS)
    o.add_argument("--warmup_steps", type=int, default=warmup_steps)
    o.add_argument("--max_grad_norm", type=float, default=1.0)
    o.add_argument("--mixed_precision", default="no", choices=MIXED_PRECISION)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--loss", default="ce", choices=LOSSES)
    o.add_argument(
        "--loss_weighting",
        default="none",
        choices=LOSS_WEIGHTINGS,
        help="inverse_t: masked CE weighted by kappa'_t / (1 - kappa_t) (1 / (1 - t) for linear kappa, "
        "LLaDA's 1 / p_mask), averaged over the corruptible tokens (needs --loss ce, mask source)",
    )
    o.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in the backward")
    o.add_argument(
        "--coupling", default="unconditional", help="unconditional|prefix|infill or a mix: prefix:0.5,infill:0.5"
    )
    o.add_argument("--time_sampling", default="stratified", choices=("uniform", "stratified"))
    return o


def add_logging_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The evaluation and logging flags (shared)."""
    c = p.add_argument_group("checkpoints, evaluation, logging")
    c.add_argument("--eval_steps", type=int, default=250)
    c.add_argument("--eval_batches", type=int, default=8)
    c.add_argument("--num_samples", type=int, default=2, help="samples written to the log at each evaluation")
    c.add_argument("--logging_steps", type=int, default=10)
    c.add_argument("--num_workers", type=int, default=1, help="processes for tokenization")
    c.add_argument("--no_progress", action="store_true")
    return c


def parse_coupling(value: str) -> Any:
    """``"prefix"`` or ``"prefix:0.5,infill:0.5"`` -> a coupling name or a {name: weight} mix."""
    if value in COUPLINGS:
        return value
    mix: dict[str, float] = {}
    for part in value.split(","):
        name, _, weight = part.partition(":")
        if name not in COUPLINGS:
            raise ValueError(f"`--coupling` parts must be among {list(COUPLINGS)}, got {name!r} in {value!r}.")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError as e:
            raise ValueError(f"`--coupling` weight of {name!r} must be a number, got {weight!r}.") from e
        if mix[name] < 0 or not math.isfinite(mix[name]):
            raise ValueError(f"`--coupling` weight of {name!r} must be >= 0, got {weight!r}.")
    if sum(mix.values()) <= 0:
        raise ValueError(f"`--coupling` weights must not all be 0: {value!r}.")
    return mix


def validate_common_args(args: argparse.Namespace) -> None:
    """Checks of the shared data / optimisation / logging flags: ``ValueError`` naming the flag."""
    positive = ("seq_len", "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "eval_steps")
    for name in positive + ("logging_steps", "eval_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    for name in ("warmup_steps", "num_samples"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise ValueError(f"`--learning_rate` must be > 0, got {args.learning_rate}.")
    if bool(args.train_file) == bool(args.stdlib):
        raise ValueError("pass exactly one of `--train_file` and `--stdlib`.")
    if args.sft and (args.stdlib or args.streaming):
        raise ValueError(
            "`--sft` reads json / jsonl / parquet `--train_file`s in memory: not with `--stdlib` / `--streaming`."
        )
    if args.loss_weighting == "inverse_t" and args.loss != "ce":
        raise ValueError(
            "`--loss_weighting inverse_t` weights the masked cross-entropy: it needs `--loss ce` (the generalized KL "
            "is weighted by kappa'_t / (1 - kappa_t) already)."
        )
    args.coupling_spec = parse_coupling(args.coupling)


def validate_args(args: argparse.Namespace) -> None:
    """Every check that needs no data: raises ``ValueError`` naming the flag before anything is written."""
    validate_common_args(args)
    for name in ("checkpointing_steps", "checkpoints_total_limit"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    if args.tokenizer_vocab_size is not None and args.tokenizer_vocab_size < 1:
        raise ValueError(f"`--tokenizer_vocab_size` must be >= 1, got {args.tokenizer_vocab_size}.")
    if args.resume_from_checkpoint not in (None, "latest"):
        if not os.path.isdir(args.resume_from_checkpoint):
            raise ValueError(
                f"`--resume_from_checkpoint` {args.resume_from_checkpoint!r} is not a folder (or 'latest')."
            )
        if os.path.basename(os.path.normpath(args.resume_from_checkpoint)).startswith(".tmp-"):
            raise ValueError(
                f"`--resume_from_checkpoint` {args.resume_from_checkpoint!r} is a half-written checkpoint."
            )
    validate_adaptation_args(args)
    if init_source(args) is None:
        args.model_config = args.model_config or DEFAULT_MODEL_CONFIG
        args.tokenizer_vocab_size = args.tokenizer_vocab_size or DEFAULT_TOKENIZER_VOCAB_SIZE
        args.model_config_fields = _model_config_fields(args)
    else:
        args.model_config_fields = None


def init_source(args: argparse.Namespace) -> Optional[tuple[str, str]]:
    """``(flag, path)`` of ``--init_from_causal_lm`` / ``--init_from_pretrained``, or None (a random model)."""
    for flag in ("init_from_causal_lm", "init_from_pretrained"):
        if getattr(args, flag, None):
            return f"--{flag}", getattr(args, flag)
    return None


def _check_source(flag: str, path: str) -> None:
    """A local folder (or file) must exist; anything else must look like a Hub repo id."""
    if os.path.exists(path):
        return
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or not path.strip():
        raise ValueError(f"`{flag}` {path!r} is neither an existing folder nor a Hub repo id.")


def validate_adaptation_args(args: argparse.Namespace) -> None:
    """Checks of the adaptation / LoRA flags (no model is read): ``ValueError`` naming the flag."""
    if args.init_from_causal_lm and args.init_from_pretrained:
        raise ValueError("pass at most one of `--init_from_causal_lm` and `--init_from_pretrained`.")
    source = init_source(args)
    if source is not None:
        flag, path = source
        given = [
            f"--{k}"
            for k in ("model_config", "model_config_overrides", "tokenizer_name_or_path", "tokenizer_vocab_size")
            if getattr(args, k) is not None
        ]
        if given:
            raise ValueError(
                f"`{flag}` takes the architecture and the tokenizer from {path!r}: {', '.join(given)} cannot be "
                "combined with it (drop them)."
            )
        if flag == "--init_from_causal_lm" and path.lower().endswith(".gguf") and os.path.isfile(path):
            if args.gguf_file:
                raise ValueError("`--init_from_causal_lm` names a .gguf file: do not pass `--gguf_file` too.")
            args.init_from_causal_lm, args.gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
            path = args.init_from_causal_lm
        _check_source(flag, path)
        if args.gguf_file and os.path.isdir(path) and not os.path.isfile(os.path.join(path, args.gguf_file)):
            raise ValueError(f"`--gguf_file` {args.gguf_file!r} is not a file of the folder {path!r}.")
    if not args.init_from_causal_lm:
        for name in ("gguf_file", "mask_token", "mask_token_id"):
            if getattr(args, name) is not None:
                raise ValueError(f"`--{name}` applies to `--init_from_causal_lm` only.")
    if args.mask_token is not None and args.mask_token_id is not None:
        raise ValueError("pass `--mask_token` (a new token) or `--mask_token_id` (an existing one), not both.")
    if args.mask_token_id is not None and args.mask_token_id < 0:
        raise ValueError(f"`--mask_token_id` must be an existing token id (>= 0), got {args.mask_token_id}.")
    if args.attention_annealing_steps < 0:
        raise ValueError(
            f"`--attention_annealing_steps` must be >= 0 (0 = bidirectional), got {args.attention_annealing_steps}."
        )
    validate_lora_args(args, require_base=source is None and args.lora_r > 0)
    if args.sft and source is None and args.tokenizer_name_or_path is None:
        raise ValueError(
            "`--sft` needs a tokenizer that knows the data's format: pass `--init_from_causal_lm`, "
            "`--init_from_pretrained` or `--tokenizer_name_or_path`."
        )


def validate_lora_args(args: argparse.Namespace, require_base: bool = False) -> None:
    """``--lora_r`` (0 = off) / ``--lora_alpha`` (default 2r) / ``--lora_dropout`` / ``--lora_target_modules``."""
    if args.lora_r < 0:
        raise ValueError(f"`--lora_r` must be >= 0 (0 = full fine-tuning), got {args.lora_r}.")
    if require_base:
        raise ValueError(
            "`--lora_r` adapts a pretrained model: pass `--init_from_causal_lm` or `--init_from_pretrained`."
        )
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_r
    elif args.lora_r and not (args.lora_alpha > 0 and math.isfinite(args.lora_alpha)):
        raise ValueError(f"`--lora_alpha` must be > 0, got {args.lora_alpha}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"`--lora_dropout` must lie in [0, 1), got {args.lora_dropout}.")
    args.lora_target_modules_list = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if args.lora_r and not args.lora_target_modules_list:
        raise ValueError("`--lora_target_modules` must name at least one layer, e.g. q_proj,v_proj.")


def _model_config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``--model_config`` + overrides as validated DFMConfig fields, without tokenizer ids; checks ``--seq_len``."""
    from ..models import DFM_PRESETS, DFMConfig

    try:
        overrides = json.loads(args.model_config_overrides) if args.model_config_overrides else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"`--model_config_overrides` is not valid json: {e}.") from e
    if not isinstance(overrides, dict):
        raise ValueError(f"`--model_config_overrides` must be a json object, got {args.model_config_overrides!r}.")
    if args.model_config in DFM_PRESETS:
        fields = {**DFM_PRESETS[args.model_config], **overrides}
    elif os.path.isfile(args.model_config):
        with open(args.model_config, encoding="utf-8") as f:
            fields = {**json.load(f), **overrides}
    else:
        raise ValueError(
            f"`--model_config` must be a preset among {sorted(DFM_PRESETS)} or a json file, got {args.model_config!r}."
        )
    for k in ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype") + _TOKEN_IDS:
        fields.pop(k, None)  # the ids (and the vocabulary size) come from the tokenizer
    fields["loss_type"] = args.loss
    try:
        config = DFMConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`--model_config` / `--model_config_overrides`: {e}") from e
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"`--seq_len` {args.seq_len} exceeds the model's max_position_embeddings={config.max_position_embeddings}."
        )
    return fields


def _model_config(args: argparse.Namespace, tokenizer: Any) -> Any:
    from ..models import DFMConfig

    ids = {k: getattr(tokenizer, k, None) for k in _TOKEN_IDS if k != "vocab_size"}
    return DFMConfig(**args.model_config_fields, vocab_size=len(tokenizer), **ids)


def _scheduler(args: argparse.Namespace, tokenizer: Any, vocab_size: Optional[int] = None, base: Any = None) -> Any:
    """The training path: ``--scheduler_config``, else ``base`` (a pretrained pipeline's DiscreteFlowScheduler), else
    the default; the mask id of the tokenizer and the model's vocabulary size (default ``len(tokenizer)``)."""
    from ..schedulers import DiscreteFlowScheduler

    cfg: dict[str, Any] = {}
    if args.scheduler_config:
        with open(args.scheduler_config, encoding="utf-8") as f:
            cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    elif isinstance(base, DiscreteFlowScheduler):
        cfg = {k: v for k, v in base.config.items() if not k.startswith("_")}
    cfg.update(mask_token_id=tokenizer.mask_token_id, vocab_size=vocab_size or len(tokenizer))
    if args.prediction_type:
        cfg["prediction_type"] = args.prediction_type
    return DiscreteFlowScheduler(**cfg)


def _checkpoint_dirs(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    dirs = [d for d in os.listdir(root) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    dirs = [d for d in dirs if os.path.isfile(os.path.join(root, d, "training_state.json"))]  # complete ones only
    return [os.path.join(root, d) for d in sorted(dirs, key=lambda d: int(d.split("-")[-1]))]


def _resolve_resume(args: argparse.Namespace, config: Any, tokenizer: Any) -> Optional[str]:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        dirs = _checkpoint_dirs(args.output_dir)
        if not dirs:
            return None
        path = dirs[-1]
    else:
        path = args.resume_from_checkpoint
    state_file = os.path.join(path, "training_state.json")
    if not os.path.isfile(state_file):
        raise ValueError(f"`--resume_from_checkpoint` {path!r} is incomplete (no training_state.json).")
    with open(state_file, encoding="utf-8") as f:
        state = json.load(f)
    saved, current = state.get("model_config", {}), _config_signature(config)
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        raise ValueError(
            f"`--resume_from_checkpoint` {path!r} was written for a different model config (differs in {diff})."
        )
    if state.get("tokenizer_sha256", _tokenizer_fingerprint(tokenizer)) != _tokenizer_fingerprint(tokenizer):
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
    }


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def _config_signature(config: Any) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    keys += ("max_position_embeddings", "time_conditioning", "mask_token_id")
    return {k: getattr(config, k) for k in keys}


class BatchPlan:
    """Rows of each (step, micro-step, rank) as a pure function of the seed (see the module docstring)."""

    def __init__(self, num_rows: Optional[int], batch_size: int, accumulation: int, world: int, seed: int) -> None:
        self.n, self.bs, self.acc, self.world, self.seed = num_rows, batch_size, accumulation, world, seed
        self._perm_epoch, self._perm = -1, None

    def global_index(self, step: int, micro: int, rank: int) -> int:
        return (step * self.acc + micro) * self.world + rank

    def rows(self, step: int, micro: int, rank: int) -> list[int]:
        start = self.global_index(step, micro, rank) * self.bs
        if self.n is None:  # a stream: positions in the (per-epoch shuffled) stream itself, see StreamedRows
            return list(range(start, start + self.bs))
        out = []
        for pos in range(start, start + self.bs):
            epoch, offset = divmod(pos, self.n)
            if epoch != self._perm_epoch:
                self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
                self._perm_epoch = epoch
            out.append(int(self._perm[offset]))
        return out


class StreamedRows:
    """Packed rows of a streamed ``datasets.IterableDataset``, read lazily in stream order (``--streaming``).

    Indexing takes increasing global row positions (what :class:`BatchPlan` gives a process); the stream is shuffled
    with a buffer per epoch (seed + epoch) and restarts when exhausted, so positions are a pure function of the seed
    and a resumed run skips ahead to the very rows the uninterrupted run would read. Memory: one buffer, not the corpus.
    """

    def __init__(self, ds: Any, seed: int, buffer_size: int = 1000) -> None:
        self.ds, self.seed, self.buffer_size = ds, seed, buffer_size
        self._iter: Any = None
        self._next = 0  # global position of the next row the iterator yields

    def _stream(self) -> Any:
        import itertools

        for epoch in itertools.count():
            empty = True
            for example in self.ds.shuffle(seed=self.seed * 1000 + epoch, buffer_size=self.buffer_size):
                empty = False
                yield example["input_ids"]
            if empty:
                raise ValueError("`--train_file`: the stream packs no row of `--seq_len` tokens.")

    def __getitem__(self, positions: list[int]) -> torch.Tensor:
        out = []
        for pos in positions:
            if self._iter is None or pos < self._next:
                self._iter, self._next = self._stream(), 0
            while self._next < pos:
                next(self._iter)
                self._next += 1
            out.append(next(self._iter))
            self._next += 1
        return torch.tensor(out, dtype=torch.long)

    def __len__(self) -> int:
        raise TypeError("a streamed dataset has no length")


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks (shared with lora_finetune.py)
# ---------------------------------------------------------------------------------------------------------------------


def make_accelerator(args: argparse.Namespace) -> Any:
    """An ``Accelerator``; ``cpu=True`` without a GPU, so that torchrun's CPU processes form one gloo group."""
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )


def data_files(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Training and validation files of ``--stdlib`` / ``--train_file`` / ``--validation_file`` (checked to exist)."""
    from ..data.corpus import expand_data_files, split_by_file, stdlib_python_files

    if args.stdlib:
        return split_by_file(stdlib_python_files(), args.validation_fraction)
    train_files = expand_data_files(args.train_file, "--train_file")
    val_files = expand_data_files(args.validation_file, "--validation_file") if args.validation_file else []
    return train_files, val_files


def load_rows(
    args: argparse.Namespace, tokenizer: Any, train_files: list[str], val_files: list[str], accelerator: Any
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Tokenize and pack the files into ``(rows, --seq_len)`` LongTensors; ``ValueError`` if a split packs no row.

    With ``--sft``: :class:`dfm_hf.data.sft.SFTRows` (one example per row, prompt marked as conditioning) instead.
    """
    from ..data.corpus import load_text_dataset, pack_dataset

    if getattr(args, "sft", False):
        return load_sft_rows(args, tokenizer, train_files, val_files, accelerator)
    if args.streaming:
        stream = pack_dataset(load_text_dataset(train_files, args.text_column, streaming=True), tokenizer,
                              args.seq_len, args.text_column)  # fmt: skip
        if next(iter(stream), None) is None:
            raise ValueError(f"`--train_file`: the data holds fewer than `--seq_len`={args.seq_len} tokens.")
        val_rows = None
        if val_files:
            val_ds = pack_dataset(
                load_text_dataset(val_files, args.text_column), tokenizer, args.seq_len, args.text_column
            )
            val_rows = torch.tensor(val_ds["input_ids"], dtype=torch.long) if len(val_ds) else None
        return StreamedRows(stream, args.seed), val_rows
    with accelerator.main_process_first():
        train_ds = pack_dataset(
            load_text_dataset(train_files, args.text_column),
            tokenizer,
            args.seq_len,
            args.text_column,
            args.num_workers,
        )
        val_ds = (
            pack_dataset(load_text_dataset(val_files, args.text_column), tokenizer, args.seq_len, args.text_column)
            if val_files
            else None
        )
    if len(train_ds) == 0:
        raise ValueError(f"`--train_file`: the data holds fewer than `--seq_len`={args.seq_len} tokens.")
    if args.validation_file and len(val_ds) == 0:
        raise ValueError(f"`--validation_file`: the data holds fewer than `--seq_len`={args.seq_len} tokens.")
    train_rows = torch.tensor(train_ds["input_ids"], dtype=torch.long)
    val_rows = torch.tensor(val_ds["input_ids"], dtype=torch.long) if val_ds is not None and len(val_ds) else None
    return train_rows, val_rows


def load_sft_rows(
    args: argparse.Namespace, tokenizer: Any, train_files: list[str], val_files: list[str], accelerator: Any
) -> tuple[Any, Any]:
    """``--sft`` data as :class:`dfm_hf.data.sft.SFTRows` (training, validation or None)."""
    from ..data.sft import load_sft_dataset, tokenize_sft

    columns = {
        "prompt_column": args.prompt_column,
        "completion_column": args.completion_column,
        "messages_column": args.messages_column,
    }
    with accelerator.main_process_first():
        train = tokenize_sft(
            load_sft_dataset(train_files, "--train_file"), tokenizer, args.seq_len, **columns, argument="--train_file"
        )
        val = None
        if val_files:
            val = tokenize_sft(
                load_sft_dataset(val_files, "--validation_file"),
                tokenizer,
                args.seq_len,
                **columns,
                argument="--validation_file",
            )
    return train, val


def make_optimizer(params: Any, args: argparse.Namespace, num_processes: int) -> tuple[Any, Any]:
    """AdamW and the ``--lr_scheduler`` schedule, to be passed through ``accelerator.prepare``.

    accelerate steps a prepared schedule ``num_processes`` times per optimizer step, so the schedule counts in those
    units (as the diffusers scripts do): every process count then follows the same learning-rate curve per step.
    """
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    lr_sched = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps * num_processes,
                             num_training_steps=args.max_train_steps * num_processes)  # fmt: skip
    return optimizer, lr_sched


def make_collator(scheduler: Any, args: argparse.Namespace, tokenizer: Any) -> Any:
    """The training collator: the scheduler's path, ``--coupling`` and ``--time_sampling``."""
    from .collator import DFMDataCollator

    return DFMDataCollator(scheduler=scheduler, coupling=args.coupling_spec, time_sampling=args.time_sampling,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def make_logger(output_dir: str, enabled: bool) -> Any:
    """``log(record)``: appends a json line to ``output_dir/logs/metrics.jsonl`` (and tensorboard) when ``enabled``."""
    log_path = os.path.join(output_dir, "logs", "metrics.jsonl")
    tb = None
    if enabled:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        tb = _tensorboard(os.path.dirname(log_path))

    def log(record: dict[str, Any]) -> None:
        if enabled:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        tb.add_scalar(k, v, record["step"])

    return log


def run_record(accelerator: Any, args: argparse.Namespace, step: int, **extra: Any) -> dict[str, Any]:
    """The ``"event": "start"`` log line: the real process group (size, backend) and the global batch."""
    world = accelerator.num_processes
    return {"step": step, "event": "start", "num_processes": world,
            "distributed_type": str(accelerator.distributed_type),
            "global_batch_size": args.train_batch_size * args.gradient_accumulation_steps * world, **extra}  # fmt: skip


def train_step(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    lr_sched: Any,
    collator: Any,
    plan: BatchPlan,
    rows: torch.Tensor,
    step: int,
    args: argparse.Namespace,
) -> float:
    """One optimizer step (``--gradient_accumulation_steps`` micro-steps) on this process's planned rows.

    Each micro-batch's corruption, and with ``--attention_annealing_steps`` its attention mask, is drawn from
    generators seeded by its global index, so the step is a pure function of (seed, step, model state). The LM head
    runs only at the scored positions (the loss reads nothing else). ``--loss_weighting inverse_t`` replaces the
    model's loss by :func:`dfm_hf.training.losses.inverse_t_cross_entropy_loss`. Returns the loss averaged over
    micro-steps and processes.
    """
    from ..models.modeling_dfm import IGNORE_INDEX
    from .collator import annealed_attention_mask, annealing_visible_fraction
    from .losses import inverse_t_cross_entropy_loss

    visible = annealing_visible_fraction(step, getattr(args, "attention_annealing_steps", 0))
    weighting = getattr(args, "loss_weighting", "none")
    losses = []
    for micro in range(args.gradient_accumulation_steps):
        g_index = plan.global_index(step, micro, accelerator.process_index)
        collator.generator = torch.Generator().manual_seed(args.seed * 7_919 + g_index)
        batch = collator(rows[plan.rows(step, micro, accelerator.process_index)])
        attention = batch["attention_mask"]
        if visible < 1.0:  # bidirectional from the end of the annealing on: the plain padding mask
            attention = annealed_attention_mask(
                attention, visible, torch.Generator().manual_seed(annealing_seed(args.seed, g_index))
            )
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        scored = batch["labels"] != IGNORE_INDEX
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": attention.to(accelerator.device),
            "timesteps": batch["timesteps"],
            "logits_to_keep": scored,
        }
        with accelerator.accumulate(model):
            if weighting == "inverse_t":
                logits = model(**inputs).logits
                rate = batch["kappa_rate"][:, None].expand(scored.shape)[scored]
                corruptible = (batch["attention_mask"] != 0) & ~batch["condition_mask"]
                loss = inverse_t_cross_entropy_loss(logits, batch["labels"][scored], rate, corruptible.sum())
            else:
                loss = model(
                    **inputs,
                    labels=batch["labels"],
                    condition_mask=batch["condition_mask"],
                    kappa_rate=batch["kappa_rate"],
                ).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()


def annealing_seed(seed: int, global_index: int) -> int:
    """Seed of the annealed attention mask of micro-batch ``global_index`` (a stream apart from the collator's)."""
    return seed * 7_919 + global_index + (1 << 40)


# ---------------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run training; returns the final metrics."""
    args = build_parser().parse_args(argv)
    validate_args(args)

    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from ..data.corpus import load_text_dataset
    from ..data.tokenizer import train_bpe_tokenizer
    from ..models import DFMForMaskedGeneration
    from .collator import annealing_visible_fraction

    accelerator = make_accelerator(args)
    set_seed(args.seed)
    main_proc = accelerator.is_main_process

    # ---- data files (checked before anything is written)
    train_files, val_files = data_files(args)

    # ---- tokenizer and model: from a pretrained model (--init_from_*), or a given / trained tokenizer + a config
    base = load_init_pipeline(args)
    if base is not None:
        tokenizer = base.tokenizer
    elif args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    else:
        texts = load_text_dataset(train_files, args.text_column)[args.text_column]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.tokenizer_vocab_size)
    flag = init_source(args)[0] if base is not None else "--tokenizer_name_or_path"
    if tokenizer.mask_token_id is None:
        raise ValueError(f"`{flag}`: the tokenizer has no mask token (DFM needs one).")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"`{flag}`: the tokenizer has no eos token (it separates packed documents).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    # ---- model config, scheduler (the path used for training); resume check; packed rows
    if base is not None:
        config = base.model.config
        config.loss_type = args.loss
        if args.seq_len > config.max_position_embeddings:
            raise ValueError(
                f"`--seq_len` {args.seq_len} exceeds the model's max_position_embeddings="
                f"{config.max_position_embeddings}."
            )
        scheduler = _scheduler(args, tokenizer, config.vocab_size, base=base.scheduler)
    else:
        config = _model_config(args, tokenizer)
        scheduler = _scheduler(args, tokenizer)
    if args.loss_weighting == "inverse_t" and scheduler.config.source_distribution != "mask":
        raise ValueError("`--loss_weighting inverse_t` needs the mask source (`--scheduler_config` sets another).")
    if base is not None and args.lora_r:
        check_lora_targets(base.model, args.lora_target_modules_list)
    resume = _resolve_resume(args, config, tokenizer)
    train_rows, val_rows = load_rows(args, tokenizer, train_files, val_files, accelerator)

    # ---- from here on, things are written
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    model = base.model.to(torch.float32) if base is not None else DFMForMaskedGeneration(config)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r:
        new_rows = [config.mask_token_id] if args.init_from_causal_lm else None
        model = apply_lora(model, args, trainable_token_indices=new_rows)
    world = accelerator.num_processes
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, lr_sched = make_optimizer(trainable, args, world)
    model, optimizer, lr_sched = accelerator.prepare(model, optimizer, lr_sched)
    collator = make_collator(scheduler, args, tokenizer)
    plan = BatchPlan(
        None if args.streaming else len(train_rows),
        args.train_batch_size,
        args.gradient_accumulation_steps,
        world,
        args.seed,
    )

    start_step = 0
    if resume:
        accelerator.load_state(resume)
        with open(os.path.join(resume, "training_state.json"), encoding="utf-8") as f:
            start_step = json.load(f)["step"]
        accelerator.print(f"resumed from {resume} at step {start_step}")

    log = make_logger(args.output_dir, main_proc)
    counts = {"trainable_parameters": sum(p.numel() for p in trainable),
              "total_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters())}  # fmt: skip
    if getattr(train_rows, "stats", None):
        counts["sft_examples"] = dict(train_rows.stats)
    log(
        run_record(
            accelerator,
            args,
            start_step,
            resumed_from=resume,
            init_from=init_source(args)[1] if base is not None else None,
            tokens_per_step=args.seq_len * args.train_batch_size * args.gradient_accumulation_steps * world,
            **counts,
        )
    )

    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_train_steps, initial=start_step, disable=not main_proc or args.no_progress, desc="train")
    started, metrics, done, loss = time.time(), {}, start_step, float("nan")
    model.train()
    for step in range(start_step, args.max_train_steps):
        loss = train_step(accelerator, model, optimizer, lr_sched, collator, plan, train_rows, step, args)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        done = step + 1
        if done % args.logging_steps == 0 or done == 1:
            log(
                {
                    "step": done,
                    "loss": loss,
                    "lr": lr_sched.get_last_lr()[0],
                    "elapsed_s": time.time() - started,
                    "attention_visible_fraction": annealing_visible_fraction(step, args.attention_annealing_steps),
                }
            )
        out_of_time = args.max_train_minutes is not None and (time.time() - started) > 60 * args.max_train_minutes
        if done % args.checkpointing_steps == 0 or out_of_time:
            _save_checkpoint(accelerator, args, done, config, tokenizer)
        if val_rows is not None and (done % args.eval_steps == 0 or done == args.max_train_steps or out_of_time):
            with accelerator.autocast():  # --mixed_precision: the unwrapped (LoRA: inner) model is not autocast itself
                metrics = evaluate_model(_inner_model(accelerator, model), val_rows, scheduler, args, tokenizer)
            metrics["step"] = done
            log(metrics)
            model.train()
        if out_of_time:
            accelerator.print(f"--max_train_minutes reached at step {done}")
            break
    bar.close()
    accelerator.wait_for_everyone()
    final = {"step": done, "train_loss": loss, "wall_time_s": time.time() - started, **metrics}
    if main_proc:
        unwrapped = accelerator.unwrap_model(model)
        if args.lora_r:
            final["adapter"] = save_training_adapter(unwrapped, args, final)
            unwrapped = unwrapped.merge_and_unload()
        saved_scheduler, presets = scheduler, None
        if base is not None:
            presets = dict(base.scheduler_presets)
            if args.init_from_pretrained and not args.scheduler_config:
                saved_scheduler = base.scheduler  # a released model keeps its family's default sampler
        _save_pipeline(unwrapped, saved_scheduler, tokenizer, args, final, presets)
    accelerator.wait_for_everyone()
    return final


def load_init_pipeline(args: argparse.Namespace) -> Any:
    """The ``DFMPipeline`` of ``--init_from_causal_lm`` (converted) or ``--init_from_pretrained``; None without.

    Loading or conversion errors become ``ValueError`` naming the flag (nothing is written before)."""
    source = init_source(args)
    if source is None:
        return None
    from ..pipelines import DFMPipeline

    flag, path = source
    try:
        if flag == "--init_from_causal_lm":
            kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
            pipe = DFMPipeline.from_causal_lm(
                path, mask_token=args.mask_token or "<|mask|>", mask_token_id=args.mask_token_id, **kwargs
            )
        else:
            pipe = DFMPipeline.from_pretrained(path)
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"`{flag}` {path!r}: {e}") from e
    if pipe.tokenizer is None:
        raise ValueError(f"`{flag}` {path!r} has no tokenizer.")
    return pipe


def apply_lora(model: Any, args: argparse.Namespace, trainable_token_indices: Optional[list[int]] = None) -> Any:
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


def check_lora_targets(model: Any, targets: list[str]) -> None:
    """``ValueError`` naming ``--lora_target_modules`` when a name is not a linear layer of ``model``."""
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [m for m in targets if m not in linear]
    if missing:
        raise ValueError(
            f"`--lora_target_modules` {missing} are not linear layers of the model; it has {sorted(linear)}."
        )


def _inner_model(accelerator: Any, model: Any) -> Any:
    """The model to evaluate: unwrapped, and for LoRA the injected base model (a ``DFMForMaskedGeneration``)."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped


def save_training_adapter(peft_model: Any, args: argparse.Namespace, final: dict[str, Any]) -> str:
    """``<output_dir>/adapter``, written into a temp folder, then renamed; returns the folder. It holds:

    - ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA adapter alone (peft's format; it loads with
      ``pipe.load_lora_weights`` on the base);
    - ``embedding_rows.safetensors`` (with ``--init_from_causal_lm``): ``token_ids`` and the trained rows of
      ``model.embed_tokens.weight`` there (the mask row; a tied head shares it; an untied head's rows are added as
      ``lm_head.weight``), to be written into the converted base before the adapter is applied;
    - ``dfm_base.json``: how to rebuild that base (``DFMPipeline.from_causal_lm`` arguments, or the pretrained path);
    - ``README.md``: a card.

    :func:`load_adapted_pipeline` puts the three together again.
    """
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ..hub import render_lora_card

    path = os.path.join(args.output_dir, ADAPTER_SUBFOLDER)
    tmp = os.path.join(args.output_dir, f".tmp-{ADAPTER_SUBFOLDER}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    flag, source = init_source(args)
    base = {"init_from_causal_lm" if flag == "--init_from_causal_lm" else "init_from_pretrained": source}
    if flag == "--init_from_causal_lm":
        reused = args.mask_token_id is not None  # an existing token is the mask: no new token string
        base.update(gguf_file=args.gguf_file, mask_token=None if reused else (args.mask_token or "<|mask|>"),
                    mask_token_id=args.mask_token_id)  # fmt: skip
    (name, config), *_ = peft_model.peft_config.items()
    state = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
    rows = {k: v for k, v in state.items() if "trainable_tokens_delta" in k}
    lora = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in rows}
    save_file(lora, os.path.join(tmp, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    lora_config = copy.deepcopy(config)
    lora_config.trainable_token_indices = None  # the rows travel in embedding_rows.safetensors
    lora_config.base_model_name_or_path = source
    lora_config.inference_mode = True
    lora_config.save_pretrained(tmp)
    if rows:
        (key, values), *more = rows.items()
        if more:
            raise ValueError(f"expected one trained embedding table, got {sorted(rows)}")
        ids = torch.tensor(config.trainable_token_indices, dtype=torch.long)
        tensors = {"token_ids": ids, "model.embed_tokens.weight": values.detach().float().cpu().contiguous()}
        inner = peft_model.get_base_model()
        if not inner.config.tie_word_embeddings:  # the untied head's rows, as they are (not trained)
            tensors["lm_head.weight"] = inner.lm_head.weight.detach()[ids].float().cpu().contiguous()
        save_file(tensors, os.path.join(tmp, EMBEDDING_ROWS_FILE))
    with open(os.path.join(tmp, BASE_RECIPE_FILE), "w", encoding="utf-8") as f:
        json.dump(base, f, indent=2)
    skip = ("coupling_spec", "model_config_fields", "lora_target_modules_list")
    training = {k: v for k, v in vars(args).items() if k not in skip}
    repo = os.path.basename(os.path.abspath(args.output_dir)) + "-lora"
    render_lora_card(repo, base_model=source, training={**training, **final}).save(os.path.join(tmp, "README.md"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _tensorboard(logdir: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(logdir)


def _save_checkpoint(accelerator: Any, args: argparse.Namespace, step: int, config: Any, tokenizer: Any) -> None:
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
        with open(os.path.join(tmp, "training_state.json"), "w", encoding="utf-8") as f:
            state = {"step": step, "model_config": _config_signature(config), "recipe": training_recipe(args)}
            json.dump({**state, "tokenizer_sha256": _tokenizer_fingerprint(tokenizer)}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoint_dirs(args.output_dir)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def evaluate_model(model: Any, rows: Any, scheduler: Any, args: Any, tokenizer: Any) -> dict[str, Any]:
    """Validation CE loss, the ELBO perplexity bound and a few unconditional samples.

    The bound: ``-log p(x1) <= int_0^1 sum_i GKL_i(t) dt`` (docs/math.md, section 7); estimated with ``t``
    stratified over ``[0, 1 - 1e-3]`` on ``--eval_batches`` batches, divided by the number of tokens:
    ``ppl_bound = exp(bound)``.
    """
    from ..models.modeling_dfm import generalized_kl_loss
    from .collator import DFMDataCollator
    from .losses import kappa_rate

    model.eval()
    device = next(model.parameters()).device
    ce_total, elbo_total, tokens, ce_count = 0.0, 0.0, 0, 0
    bs = args.train_batch_size
    n_batches = min(args.eval_batches, max(1, math.ceil(len(rows) / bs)))
    collator = DFMDataCollator(scheduler=scheduler, coupling="unconditional", time_sampling="stratified",
                               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    for b in range(n_batches):
        start = (b * bs) % len(rows)
        # packed rows: a tensor slice; SFT rows (prompt as conditioning, kept by the collator): a list of examples
        chunk = rows[start:][:bs] if isinstance(rows, torch.Tensor) else rows[range(start, min(start + bs, len(rows)))]
        collator.generator = torch.Generator().manual_seed(10_000 + b)
        batch = {k: v.to(device) for k, v in collator(chunk).items() if isinstance(v, torch.Tensor)}
        scored = batch["labels"] != -100
        logits = model(
            input_ids=batch["input_ids"],
            timesteps=batch["timesteps"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=scored,
        ).logits
        labels = batch["labels"][scored]
        ce_total += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        rate = kappa_rate(batch["timesteps"], scheduler.schedule)[:, None].expand(scored.shape)[scored]
        elbo_total += generalized_kl_loss(
            logits, labels, batch["input_ids"][scored], rate.to(device), num_items_in_batch=1
        ).item()
        tokens += int(((batch["attention_mask"] != 0) & ~batch["condition_mask"]).sum())
        ce_count += int(scored.sum())
    bound = elbo_total / max(tokens, 1)
    metrics = {"val_loss": ce_total / max(ce_count, 1), "elbo_per_token": bound, "ppl_bound": math.exp(min(bound, 50))}
    if args.num_samples:
        metrics["samples"] = _samples(model, scheduler, tokenizer, args.num_samples, min(args.seq_len, 64))
    return metrics


def _samples(model: Any, scheduler: Any, tokenizer: Any, n: int, length: int) -> list[str]:
    from ..pipelines import DFMPipeline
    from ..schedulers import DiscreteFlowScheduler

    if scheduler.config.prediction_type != "sample":
        return []
    sampler = DiscreteFlowScheduler.from_config(scheduler.config)
    pipe = DFMPipeline(model=model, scheduler=sampler, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(gen_length=length, num_inference_steps=length, num_samples_per_prompt=n, generator=g).texts


def _save_pipeline(
    model: Any,
    scheduler: Any,
    tokenizer: Any,
    args: argparse.Namespace,
    final: dict,
    presets: Optional[dict[str, Any]] = None,
) -> None:
    from ..hub import write_training_card
    from ..pipelines import DFMPipeline

    model = model.to(torch.float32).eval()
    pipe = DFMPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    if presets:
        pipe.scheduler_presets = {**pipe.scheduler_presets, **presets}
    pipe.save_pretrained(args.output_dir)
    write_training_card(args.output_dir, vars(args), final)


if __name__ == "__main__":
    main()
