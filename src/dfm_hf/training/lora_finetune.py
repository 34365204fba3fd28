"""Fine-tune a saved DFM pipeline's model with a PEFT LoRA adapter: ``python examples/finetune_lora.py ...``.

Top to bottom: arguments -> checks (before anything is written) -> the base pipeline (folder or Hub id: its model,
tokenizer and scheduler config) -> data (the flags of :mod:`.arguments`, the rows of :mod:`.batches`) ->
``peft.get_peft_model`` on the projection layers -> the training step of :mod:`.train` (same batch plan, loss,
accumulation, clipping, multi-process) ->
the adapter (``adapter_config.json`` + ``adapter_model.safetensors`` + a card naming the base model) and, with
``--merge``, a full merged ``DFMPipeline`` in ``<output_dir>/merged``.

The base may be a released LLaDA / Dream / DiffuCoder folder or repo (converted on load by
``DFMPipeline.from_pretrained``; their projections carry the same names). ``--sft`` trains on prompt/completion or
chat data (the prompt conditions; only the response and its EOS are corrupted and scored). ``--block_size K``
trains the adapter on the block-diffusion objective of a base made a block model (:mod:`.block_diffusion`); the
adapter alone does not carry that: load it on a base with ``config.block_size = K`` (the ``--merge`` folder does).

peft is called directly (``get_peft_model``, ``PeftModel.save_pretrained``, ``merge_and_unload``): transformers 5.24's
own adapter methods refuse peft < 0.22. Load the adapter with ``DFMPipeline.load_lora_weights(output_dir)``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Optional

import torch

from .adapters import LORA_TARGET_MODULES, check_lora_targets, set_block_size
from .arguments import (
    add_block_diffusion_arguments,
    add_data_arguments,
    add_logging_arguments,
    add_optimisation_arguments,
    validate_block_diffusion,
    validate_common_args,
)
from .batches import BatchPlan, data_files, load_rows, make_collator
from .train import evaluate_model, make_accelerator, make_logger, make_optimizer, run_record, train_step

#: The folder of the merged pipeline (``--merge``), inside ``--output_dir``.
MERGED_SUBFOLDER = "merged"


def build_parser() -> argparse.ArgumentParser:
    """The fine-tuning flags: the base pipeline, LoRA settings and the data / optimisation flags of ``train.py``."""
    p = argparse.ArgumentParser(description="Fine-tune a DFM pipeline's model with a LoRA adapter (PEFT).")
    b = p.add_argument_group("base model and LoRA")
    b.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="a saved DFMPipeline or a released LLaDA / Dream / DiffuCoder model (folder or Hub id)",
    )
    b.add_argument("--revision", default=None, help="Hub revision of the base pipeline")
    b.add_argument("--target_modules", default=",".join(LORA_TARGET_MODULES), help="comma-separated layer names")
    b.add_argument("--lora_r", type=int, default=8)
    b.add_argument("--lora_alpha", type=float, default=16.0)
    b.add_argument("--lora_dropout", type=float, default=0.0)
    b.add_argument(
        "--merge", action="store_true", help=f"also save a merged full pipeline in <output_dir>/{MERGED_SUBFOLDER}"
    )
    b.add_argument("--hub_model_id", default=None, help="adapter repo id named in its card (default: the folder name)")
    add_data_arguments(p)
    add_block_diffusion_arguments(p)
    add_optimisation_arguments(p, learning_rate=1e-3, warmup_steps=10, max_train_steps=200)
    add_logging_arguments(p)
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need neither data nor the base model: ``ValueError`` naming the flag."""
    validate_common_args(args)
    if args.lora_r < 1:
        raise ValueError(f"`--lora_r` must be >= 1, got {args.lora_r}.")
    if not (args.lora_alpha > 0 and torch.isfinite(torch.tensor(args.lora_alpha))):
        raise ValueError(f"`--lora_alpha` must be > 0, got {args.lora_alpha}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"`--lora_dropout` must lie in [0, 1), got {args.lora_dropout}.")
    args.target_modules_list = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    if not args.target_modules_list:
        raise ValueError("`--target_modules` must name at least one layer, e.g. q_proj,v_proj.")


def load_base_pipeline(args: argparse.Namespace) -> Any:
    """The base ``DFMPipeline`` of ``--pretrained_model_name_or_path``, checked against ``--seq_len``, targets;
    with ``--block_size`` its model becomes a block-diffusion model."""
    from ..pipelines import DFMPipeline

    name = args.pretrained_model_name_or_path
    kwargs = {"revision": args.revision} if args.revision else {}
    try:
        pipe = DFMPipeline.from_pretrained(name, **kwargs)
    except Exception as e:  # a missing folder, an unknown Hub id, a folder that is not a pipeline
        raise ValueError(f"`--pretrained_model_name_or_path` {name!r} is not a loadable DFM pipeline: {e}") from e
    if pipe.tokenizer is None or pipe.tokenizer.mask_token_id is None or pipe.tokenizer.eos_token_id is None:
        raise ValueError(f"`--pretrained_model_name_or_path` {name!r} needs a tokenizer with mask and eos tokens.")
    if pipe.tokenizer.pad_token_id is None:
        pipe.tokenizer.pad_token = pipe.tokenizer.eos_token
    max_len = pipe.model.config.max_position_embeddings
    if args.seq_len > max_len:
        raise ValueError(f"`--seq_len` {args.seq_len} exceeds the base model's max_position_embeddings={max_len}.")
    check_lora_targets(pipe.model, args.target_modules_list, flag="--target_modules")
    set_block_size(pipe.model, args.block_size)
    return pipe


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Fine-tune and save the adapter (and, with ``--merge``, the merged pipeline); returns the final metrics."""
    args = build_parser().parse_args(argv)
    validate_args(args)

    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model

    from ..schedulers import DiscreteFlowScheduler

    accelerator = make_accelerator(args)
    set_seed(args.seed)
    main_proc = accelerator.is_main_process

    # ---- data files, base pipeline, packed rows (checked before anything is written)
    train_files, val_files = data_files(args)
    pipe = load_base_pipeline(args)
    tokenizer = pipe.tokenizer
    scheduler = DiscreteFlowScheduler.from_config(pipe.scheduler.config)  # the probability path of the collator
    if args.loss_weighting == "inverse_t" and scheduler.config.source_distribution != "mask":
        raise ValueError(
            "`--loss_weighting inverse_t` needs the mask source; the base pipeline's scheduler uses another."
        )
    validate_block_diffusion(args, pipe.model.config.block_size, scheduler.config.source_distribution)
    train_rows, val_rows = load_rows(args, tokenizer, train_files, val_files, accelerator)

    # ---- from here on, things are written
    os.makedirs(args.output_dir, exist_ok=True)
    model = pipe.model
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules_list,
        bias="none",
    )
    torch.manual_seed(args.seed)
    peft_model = get_peft_model(model, lora_config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    world = accelerator.num_processes
    optimizer, lr_sched = make_optimizer(trainable, args, world)
    collator = make_collator(scheduler, args, tokenizer, return_clean_ids=model.config.block_size is not None,
                             fim_token_ids=getattr(model.config, "fim_token_ids", None))  # fmt: skip
    num_rows = None if args.streaming else len(train_rows)
    plan = BatchPlan(num_rows, args.train_batch_size, args.gradient_accumulation_steps, world, args.seed)
    log = make_logger(args.output_dir, main_proc)
    counts = {"trainable_parameters": sum(p.numel() for p in trainable)}
    counts["total_parameters"] = sum(p.numel() for p in peft_model.parameters())
    if getattr(train_rows, "stats", None):
        counts["sft_examples"] = dict(train_rows.stats)
    log(run_record(accelerator, args, 0, base_model=args.pretrained_model_name_or_path, **counts))

    base_metrics: dict[str, Any] = {}
    if val_rows is not None:  # LoRA's B starts at zero: this is the base model
        with accelerator.autocast():  # the same precision as the evaluations during training
            base_metrics = evaluate_model(peft_model.get_base_model(), val_rows, scheduler, args, tokenizer)
        log({"step": 0, **base_metrics})
    peft_model, optimizer, lr_sched = accelerator.prepare(peft_model, optimizer, lr_sched)

    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_train_steps, disable=not main_proc or args.no_progress, desc="lora")
    started, metrics, loss = time.time(), {}, float("nan")
    peft_model.train()
    for step in range(args.max_train_steps):
        loss = train_step(accelerator, peft_model, optimizer, lr_sched, collator, plan, train_rows, step, args)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        done = step + 1
        if done % args.logging_steps == 0 or done == 1:
            log({"step": done, "loss": loss, "lr": lr_sched.get_last_lr()[0], "elapsed_s": time.time() - started})
        if val_rows is not None and (done % args.eval_steps == 0 or done == args.max_train_steps):
            unwrapped = accelerator.unwrap_model(peft_model).get_base_model()
            with accelerator.autocast():  # --mixed_precision: the inner model is not autocast itself
                metrics = evaluate_model(unwrapped, val_rows, scheduler, args, tokenizer)
            metrics["step"] = done
            log(metrics)
            peft_model.train()
    bar.close()
    accelerator.wait_for_everyone()
    final = {"step": args.max_train_steps, "train_loss": loss, "wall_time_s": time.time() - started, **metrics}
    if "val_loss" in base_metrics:
        final["base_val_loss"] = base_metrics["val_loss"]
    final.update(counts)
    if main_proc:
        save_adapter(accelerator.unwrap_model(peft_model), args, final)
        if args.merge:
            save_merged_pipeline(accelerator.unwrap_model(peft_model), pipe, args, final)
    accelerator.wait_for_everyone()
    return final


def save_adapter(peft_model: Any, args: argparse.Namespace, final: dict[str, Any]) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (peft's ``save_pretrained``) and a LoRA card."""
    from ..hub import render_lora_card

    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = args.pretrained_model_name_or_path
    peft_model.save_pretrained(args.output_dir, safe_serialization=True, save_embedding_layers=False)  # frozen
    repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    training = {k: v for k, v in vars(args).items() if k not in ("coupling_spec", "target_modules_list")}
    card = render_lora_card(repo, base_model=args.pretrained_model_name_or_path, training={**training, **final})
    card.save(os.path.join(args.output_dir, "README.md"))  # replaces the card peft writes


def save_merged_pipeline(peft_model: Any, pipe: Any, args: argparse.Namespace, final: dict[str, Any]) -> str:
    """Merge the adapter into the base weights and save a full ``DFMPipeline`` in ``<output_dir>/merged``."""
    from ..hub import write_training_card
    from ..pipelines import DFMPipeline

    merged = peft_model.merge_and_unload().to(torch.float32).eval()
    out = DFMPipeline(model=merged, scheduler=pipe.scheduler, tokenizer=pipe.tokenizer)
    out.scheduler_presets = dict(pipe.scheduler_presets)
    path = os.path.join(args.output_dir, MERGED_SUBFOLDER)
    out.save_pretrained(path)
    training = {k: v for k, v in vars(args).items() if k != "target_modules_list"}
    write_training_card(path, training, final)
    return path


if __name__ == "__main__":
    main()
