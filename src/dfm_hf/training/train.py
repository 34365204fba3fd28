"""Train a DFM model with accelerate: ``python examples/train_dfm.py ...`` or ``dfm-hf train ...``.

Read it top to bottom: arguments (:mod:`.arguments`, checked before anything is written) -> data files -> tokenizer
-> model, scheduler and collator -> resume (:mod:`.checkpoints`) -> loop (:func:`train_step`: accumulate, clip, step;
log, evaluate, checkpoint) -> save a full DFMPipeline + card. Every batch is a pure function of (seed, step,
micro-step, rank) (:mod:`.batches`), so two processes equal one with twice the accumulation and a resumed run equals
the uninterrupted one. The loss is chosen here (``--loss``, ``--loss_weighting``; :func:`~.losses.batch_loss`).

Adaptation (``--init_from_causal_lm``, ``--init_from_pretrained``, ``--lora_r``; :mod:`.adapters`): a Llama /
Mistral / Qwen2 causal LM converted by ``DFMPipeline.from_causal_lm``, trained with DiffuLLaMA's attention annealing
(``--attention_annealing_steps``), the ``1/t``-weighted masked CE (``--loss_weighting inverse_t``), full fine-tuning
or LoRA (plus the mask embedding row; the output folder then also holds the shippable ``adapter/``). ``--sft`` reads
prompt/completion or chat data (the prompt conditions, only the response and its EOS are scored).

Block diffusion (``--block_size K``, or a base / ``--model_config`` that has ``block_size``): the model attends
bidirectionally inside blocks of ``K`` positions and causally across them, and trains on BD3-LM's vectorized objective
(:mod:`.block_diffusion`: ``[x_t | x_1]`` in one forward); ``--complementary_masks`` pairs each row with its complement.

Two CPU processes: ``torchrun --nproc_per_node 2 examples/train_dfm.py ...`` (or ``accelerate launch --multi_gpu``;
on a CPU-only machine ``accelerate launch --num_processes 2``, with or without ``--cpu``, starts ONE process). The
first line of ``logs/metrics.jsonl`` (``"event": "start"``) records the real group size and backend.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from ..data.fim import fim_token_ids_of
from ..devices import accelerator_available
from ..models.losses import IGNORE_INDEX, generalized_kl_loss
from .adapters import apply_lora, check_lora_targets, init_source, load_init_pipeline, save_training_adapter
from .arguments import TOKEN_ID_KEYS, build_parser, validate_args, validate_block_diffusion
from .batches import BatchPlan, data_files, draw_micro_batch, load_rows, make_collator
from .block_diffusion import scored_logits
from .checkpoints import read_checkpoint_step, resolve_resume, save_checkpoint
from .collator import DFMDataCollator, annealing_visible_fraction
from .losses import batch_loss, kappa_rate

__all__ = [
    "evaluate_model",
    "main",
    "make_accelerator",
    "make_logger",
    "make_optimizer",
    "run_record",
    "train_step",
]


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks (shared with lora_finetune.py)
# ---------------------------------------------------------------------------------------------------------------------


def make_accelerator(args: argparse.Namespace) -> Any:
    """An ``Accelerator`` on accelerate's device choice (CUDA, MPS, XPU, ... where present); ``cpu=True`` only on a
    machine with no accelerator (:func:`~dfm_hf.devices.accelerator_available`), so that torchrun's CPU processes
    form one gloo group (accelerate otherwise gives each of them its own run)."""
    from accelerate import Accelerator

    return Accelerator(
        cpu=not accelerator_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )


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


def make_logger(output_dir: str, enabled: bool) -> Callable[[dict[str, Any]], None]:
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


def _tensorboard(logdir: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(logdir)


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
    collator: DFMDataCollator,
    plan: BatchPlan,
    rows: Any,
    step: int,
    args: argparse.Namespace,
) -> float:
    """One optimizer step (``--gradient_accumulation_steps`` micro-steps) on this process's planned rows.

    Each micro-batch (and with ``--attention_annealing_steps`` its attention mask) is drawn by
    :func:`~.batches.draw_micro_batch`, so the step is a pure function of (seed, step, model state). The LM head runs
    only at the scored positions (the loss reads nothing else; :func:`~.block_diffusion.scored_logits`: a block model
    trains on the block-diffusion objective); the loss is :func:`~.losses.batch_loss` of ``--loss`` and
    ``--loss_weighting``. Returns the loss averaged over micro-steps and processes.
    """
    visible = annealing_visible_fraction(step, getattr(args, "attention_annealing_steps", 0))
    weighting = getattr(args, "loss_weighting", "none")
    unwrapped = accelerator.unwrap_model(model)
    losses = []
    for micro in range(args.gradient_accumulation_steps):
        batch, attention = draw_micro_batch(
            collator, plan, rows, step, micro, accelerator.process_index, args.seed, visible
        )
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with accelerator.accumulate(model):
            logits = scored_logits(model, batch, attention.to(accelerator.device), unwrapped)
            loss = batch_loss(logits, batch, args.loss, weighting)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()


# ---------------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run training; returns the final metrics."""
    args = build_parser().parse_args(argv)
    validate_args(args)

    from accelerate.utils import set_seed

    from ..models import DFMForMaskedGeneration
    from ..pipelines.fim import add_fim_tokens

    accelerator = make_accelerator(args)
    set_seed(args.seed)
    main_proc = accelerator.is_main_process

    # ---- data files (checked before anything is written)
    train_files, val_files = data_files(args)

    # ---- tokenizer and model: from a pretrained model (--init_from_*), or a given / trained tokenizer + a config
    base = load_init_pipeline(args)
    tokenizer = _tokenizer(args, base, train_files)
    new_fim_rows = add_fim_tokens(base) if args.fim_rate and base is not None else []  # --fim_rate's control tokens

    # ---- model config, scheduler (the path used for training); resume check; packed rows
    if base is not None:
        config = base.model.config
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
    validate_block_diffusion(args, config.block_size, scheduler.config.source_distribution)
    if base is not None and args.lora_r:
        check_lora_targets(base.model, args.lora_target_modules_list)
    resume = resolve_resume(args, config, tokenizer)
    train_rows, val_rows = load_rows(args, tokenizer, train_files, val_files, accelerator)

    # ---- from here on, things are written
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    model = base.model.to(torch.float32) if base is not None else DFMForMaskedGeneration(config)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r:
        new_rows = ([config.mask_token_id] if args.init_from_causal_lm else []) + new_fim_rows
        model = apply_lora(model, args, trainable_token_indices=new_rows or None)
    world = accelerator.num_processes
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, lr_sched = make_optimizer(trainable, args, world)
    model, optimizer, lr_sched = accelerator.prepare(model, optimizer, lr_sched)
    collator = make_collator(scheduler, args, tokenizer, return_clean_ids=config.block_size is not None,
                             fim_token_ids=config.fim_token_ids)  # fmt: skip
    num_rows = None if args.streaming else len(train_rows)
    plan = BatchPlan(num_rows, args.train_batch_size, args.gradient_accumulation_steps, world, args.seed)

    start_step = 0
    if resume:
        accelerator.load_state(resume)
        start_step = read_checkpoint_step(resume)
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
            block_size=config.block_size,
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
            save_checkpoint(accelerator, args, done, config, tokenizer)
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


def _tokenizer(args: argparse.Namespace, base: Any, train_files: list[str]) -> Any:
    """The run's tokenizer: the pretrained model's, ``--tokenizer_name_or_path``, or a BPE trained on the data;
    ``ValueError`` naming the flag when it has no mask or eos token."""
    if base is not None:
        tokenizer = base.tokenizer
    elif args.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    else:
        from ..data.corpus import load_text_dataset
        from ..data.tokenizer import train_bpe_tokenizer

        texts = load_text_dataset(train_files, args.text_column)[args.text_column]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.tokenizer_vocab_size)
    flag = init_source(args)[0] if base is not None else "--tokenizer_name_or_path"
    if tokenizer.mask_token_id is None:
        raise ValueError(f"`{flag}`: the tokenizer has no mask token (DFM needs one).")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"`{flag}`: the tokenizer has no eos token (it separates packed documents).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_config(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The DFMConfig of a model trained from scratch: ``--model_config`` + overrides, the tokenizer's ids and size."""
    from ..models import DFMConfig

    ids = {k: getattr(tokenizer, k, None) for k in TOKEN_ID_KEYS if k != "vocab_size"}
    fim = fim_token_ids_of(tokenizer) if args.fim_rate else None  # adds missing FIM tokens before the size is read
    return DFMConfig(**args.model_config_fields, vocab_size=len(tokenizer), fim_token_ids=fim, **ids)


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


def _inner_model(accelerator: Any, model: Any) -> Any:
    """The model to evaluate: unwrapped, and for LoRA the injected base model (a ``DFMForMaskedGeneration``)."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation and the saved pipeline
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_model(model: Any, rows: Any, scheduler: Any, args: Any, tokenizer: Any) -> dict[str, Any]:
    """Validation CE loss, the ELBO perplexity bound and a few unconditional samples.

    The bound: ``-log p(x1) <= int_0^1 sum_i GKL_i(t) dt`` (docs/math.md, section 7); estimated with ``t``
    stratified over ``[0, 1 - 1e-3]`` on ``--eval_batches`` batches, divided by the number of tokens:
    ``ppl_bound = exp(bound)``. A block model (``config.block_size``) is scored on the block-diffusion objective
    (each block given the clean blocks before it), whose sum over blocks bounds ``-log p(x1)`` the same way.
    """
    model.eval()
    device = next(model.parameters()).device
    ce_total, elbo_total, tokens, ce_count = 0.0, 0.0, 0, 0
    bs = args.train_batch_size
    n_batches = min(args.eval_batches, max(1, math.ceil(len(rows) / bs)))
    block_model = getattr(model.config, "block_size", None) is not None
    collator = DFMDataCollator(scheduler=scheduler, coupling="unconditional", time_sampling="stratified",
                               pad_token_id=tokenizer.pad_token_id, return_clean_ids=block_model)  # fmt: skip
    for b in range(n_batches):
        start = (b * bs) % len(rows)
        # packed rows: a tensor slice; SFT rows (prompt as conditioning, kept by the collator): a list of examples
        chunk = rows[start:][:bs] if isinstance(rows, torch.Tensor) else rows[range(start, min(start + bs, len(rows)))]
        collator.generator = torch.Generator().manual_seed(10_000 + b)
        batch = {k: v.to(device) for k, v in collator(chunk).items() if isinstance(v, torch.Tensor)}
        scored = batch["labels"] != IGNORE_INDEX
        logits = scored_logits(model, batch)
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
