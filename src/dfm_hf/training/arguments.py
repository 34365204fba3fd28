"""The training flags (diffusers example-script style) and their checks.

Every check that needs no data runs in :func:`validate_args`, before anything is written: a bad flag is a
``ValueError`` naming it and the accepted values. The data / optimisation / logging groups are shared with
``lora_finetune.py`` (:func:`add_data_arguments`, :func:`add_optimisation_arguments`, :func:`add_logging_arguments`,
:func:`validate_common_args`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Optional

from ..hub.download import is_repo_id
from ..paths import COUPLINGS, PREDICTION_TYPES
from .adapters import LORA_TARGET_MODULES, init_source
from .losses import LOSS_TYPES, LOSS_WEIGHTINGS

__all__ = [
    "DEFAULT_MODEL_CONFIG",
    "DEFAULT_TOKENIZER_VOCAB_SIZE",
    "LR_SCHEDULERS",
    "MIXED_PRECISION",
    "TOKEN_ID_KEYS",
    "add_adaptation_arguments",
    "add_block_diffusion_arguments",
    "add_data_arguments",
    "add_logging_arguments",
    "add_optimisation_arguments",
    "build_parser",
    "parse_coupling",
    "validate_adaptation_args",
    "validate_args",
    "validate_block_diffusion",
    "validate_common_args",
    "validate_lora_args",
]

#: ``--model_config`` and ``--tokenizer_vocab_size`` of a model trained from scratch.
DEFAULT_MODEL_CONFIG = "tiny"
DEFAULT_TOKENIZER_VOCAB_SIZE = 8192
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
#: Config fields that come from the tokenizer, never from ``--model_config``.
TOKEN_ID_KEYS = ("vocab_size", "mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id")


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
    add_block_diffusion_arguments(p)
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


def add_block_diffusion_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The block-diffusion flags (shared by the training and fine-tuning scripts)."""
    b = p.add_argument_group("block diffusion")
    b.add_argument(
        "--block_size",
        type=int,
        default=None,
        help="train a block-diffusion model with blocks of K positions (config.block_size = K: bidirectional inside "
        "a block, causal across blocks), on BD3-LM's objective [x_t | x_1] in one forward; default: the model's "
        "own (full attention for a new or converted model)",
    )
    b.add_argument(
        "--complementary_masks",
        action="store_true",
        help="pair each row with its complement (the other corruptible positions masked; Fast-dLLM v2): every "
        "position is scored once per pair, and each micro-batch holds 2 x --train_batch_size rows (mask source)",
    )
    return b


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
    d.add_argument(
        "--fim_rate",
        type=float,
        default=0.0,
        help="share of training rows rewritten as fill-in-the-middle, suffix before prefix: <fim_prefix> "
        "<fim_suffix> suffix <fim_middle> prefix middle (dfm_hf.data.fim); the tokenizer's FIM tokens, else added "
        "ones (new embedding rows, trained with LoRA too); the model's config then declares them (fim_token_ids)",
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
    o.add_argument(
        "--loss",
        default="ce",
        choices=LOSS_TYPES,
        help="ce: -log p_{1|t}(x1 | x_t) on the scored tokens; generalized_kl: the mixture-path ELBO term weighted "
        "by kappa'_t / (1 - kappa_t), averaged over the scored tokens (see dfm_hf.models.losses)",
    )
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
    if not 0.0 <= args.fim_rate <= 1.0:
        raise ValueError(f"`--fim_rate` must be a share in [0, 1], got {args.fim_rate}.")
    if args.fim_rate and args.sft:
        raise ValueError("`--fim_rate` rewrites packed rows: not with `--sft` (its prompts condition already).")
    args.coupling_spec = parse_coupling(args.coupling)
    if args.block_size is not None and not 1 <= args.block_size <= args.seq_len:
        raise ValueError(
            f"`--block_size` must be an integer in [1, --seq_len={args.seq_len}] (positions per block), got "
            f"{args.block_size}."
        )


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


def _check_source(flag: str, path: str) -> None:
    """A local folder (or file) must exist; anything else must look like a Hub repo id."""
    if os.path.exists(path):
        return
    if not is_repo_id(path):
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
    validate_block_diffusion(args, args.block_size)
    validate_lora_args(args, require_base=source is None and args.lora_r > 0)
    if args.sft and source is None and args.tokenizer_name_or_path is None:
        raise ValueError(
            "`--sft` needs a tokenizer that knows the data's format: pass `--init_from_causal_lm`, "
            "`--init_from_pretrained` or `--tokenizer_name_or_path`."
        )


def validate_block_diffusion(
    args: argparse.Namespace, block_size: Optional[int], source_distribution: Optional[str] = None
) -> None:
    """The block-diffusion flags against the run's model (its ``block_size``) and training path (its
    ``source_distribution``, when known): ``ValueError`` naming the flag."""
    if block_size is not None and getattr(args, "attention_annealing_steps", 0):
        raise ValueError(
            f"`--attention_annealing_steps` anneals towards full attention, but the model is a block-diffusion model "
            f"(block_size={block_size}) that keeps its block-causal pattern from the first step: drop one of the two."
        )
    if args.complementary_masks and source_distribution not in (None, "mask"):
        raise ValueError(
            "`--complementary_masks` masks the complement of each row's masked positions: it needs the mask source "
            f"(the training path's source is {source_distribution!r})."
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
    saving_keys = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")
    for k in saving_keys + TOKEN_ID_KEYS:
        fields.pop(k, None)  # the ids (and the vocabulary size) come from the tokenizer
    if args.block_size is not None:
        fields["block_size"] = args.block_size
    try:
        config = DFMConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`--model_config` / `--model_config_overrides`: {e}") from e
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"`--seq_len` {args.seq_len} exceeds the model's max_position_embeddings={config.max_position_embeddings}."
        )
    return fields
