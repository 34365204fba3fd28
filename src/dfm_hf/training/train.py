"""Train a DFM model with accelerate: ``python examples/train_dfm.py ...`` or ``dfm-hf train ...``.

Read it top to bottom: arguments -> checks (before anything is written) -> data -> tokenizer -> model, scheduler and
collator -> resume -> loop (accumulate, clip, step, log, evaluate, checkpoint) -> save a full DFMPipeline + card.

Batches are a pure function of (seed, step, micro-step, rank): process ``r`` of ``W`` at micro-step ``m`` of
optimizer step ``s`` reads rows ``((s * A + m) * W + r) * B ...`` of the epoch's permutation, and its corruption
(t, couplings, x_t) is drawn from a generator seeded by the same global index. So two processes with accumulation A
see exactly the global batch one process sees with accumulation 2A, and a resumed run continues with the very
batches the uninterrupted run would have used.

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

from ..models.configuration_dfm import LOSS_TYPES as LOSSES
from ..paths import COUPLINGS, PREDICTION_TYPES

LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
_TOKEN_IDS = ("vocab_size", "mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id")


def build_parser() -> argparse.ArgumentParser:
    """The training flags (diffusers example-script style)."""
    p = argparse.ArgumentParser(description="Train a Discrete Flow Matching model.")
    add_data_arguments(p)
    t = p.add_argument_group("tokenizer and model")
    t.add_argument("--tokenizer_name_or_path", default=None, help="a tokenizer folder; default: train a BPE")
    t.add_argument("--tokenizer_vocab_size", type=int, default=8192)
    t.add_argument("--model_config", default="tiny", help="DFMConfig json path or preset name (tiny/small/base)")
    t.add_argument("--model_config_overrides", default=None, help="json, e.g. '{\"num_hidden_layers\": 4}'")
    t.add_argument("--scheduler_config", default=None, help="scheduler_config.json (kappa schedule, source)")
    t.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None)
    o = add_optimisation_arguments(p)
    o.add_argument("--max_train_minutes", type=float, default=None, help="stop (and save) after this wall time")
    c = add_logging_arguments(p)
    c.add_argument("--checkpointing_steps", type=int, default=500)
    c.add_argument("--checkpoints_total_limit", type=int, default=2)
    c.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    return p


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
    args.coupling_spec = parse_coupling(args.coupling)


def validate_args(args: argparse.Namespace) -> None:
    """Every check that needs no data: raises ``ValueError`` naming the flag before anything is written."""
    validate_common_args(args)
    for name in ("checkpointing_steps", "checkpoints_total_limit", "tokenizer_vocab_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    if args.resume_from_checkpoint not in (None, "latest"):
        if not os.path.isdir(args.resume_from_checkpoint):
            raise ValueError(
                f"`--resume_from_checkpoint` {args.resume_from_checkpoint!r} is not a folder (or 'latest')."
            )
        if os.path.basename(os.path.normpath(args.resume_from_checkpoint)).startswith(".tmp-"):
            raise ValueError(
                f"`--resume_from_checkpoint` {args.resume_from_checkpoint!r} is a half-written checkpoint."
            )
    args.model_config_fields = _model_config_fields(args)


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


def _scheduler(args: argparse.Namespace, tokenizer: Any) -> Any:
    from ..schedulers import DiscreteFlowScheduler

    cfg: dict[str, Any] = {}
    if args.scheduler_config:
        with open(args.scheduler_config, encoding="utf-8") as f:
            cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    cfg.update(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer))
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
    return path


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
    """Tokenize and pack the files into ``(rows, --seq_len)`` LongTensors; ``ValueError`` if a split packs no row."""
    from ..data.corpus import load_text_dataset, pack_dataset

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

    Each micro-batch's corruption is drawn from a generator seeded by its global index, so the step is a pure function
    of (seed, step, model state). The LM head runs only at the scored positions (the loss reads nothing else). Returns
    the loss averaged over micro-steps and processes.
    """
    from ..models.modeling_dfm import IGNORE_INDEX

    losses = []
    for micro in range(args.gradient_accumulation_steps):
        g_index = plan.global_index(step, micro, accelerator.process_index)
        collator.generator = torch.Generator().manual_seed(args.seed * 7_919 + g_index)
        batch = collator(rows[plan.rows(step, micro, accelerator.process_index)])
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with accelerator.accumulate(model):
            out = model(**batch, logits_to_keep=batch["labels"] != IGNORE_INDEX)  # the head only where scored
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    return accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()


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

    accelerator = make_accelerator(args)
    set_seed(args.seed)
    main_proc = accelerator.is_main_process

    # ---- data files (checked before anything is written)
    train_files, val_files = data_files(args)

    # ---- tokenizer: given, or a byte-level BPE trained on the training documents
    if args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    else:
        texts = load_text_dataset(train_files, args.text_column)[args.text_column]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.tokenizer_vocab_size)
    if tokenizer.mask_token_id is None:
        raise ValueError("`--tokenizer_name_or_path`: the tokenizer has no mask token (DFM needs one).")
    if tokenizer.eos_token_id is None:
        raise ValueError("`--tokenizer_name_or_path`: the tokenizer has no eos token (it separates packed documents).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    # ---- model config, scheduler (the path used for training); resume check; packed rows
    config = _model_config(args, tokenizer)
    scheduler = _scheduler(args, tokenizer)
    resume = _resolve_resume(args, config, tokenizer)
    train_rows, val_rows = load_rows(args, tokenizer, train_files, val_files, accelerator)

    # ---- from here on, things are written
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    model = DFMForMaskedGeneration(config)
    world = accelerator.num_processes
    optimizer, lr_sched = make_optimizer(model.parameters(), args, world)
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
    log(run_record(accelerator, args, start_step, resumed_from=resume))

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
            log({"step": done, "loss": loss, "lr": lr_sched.get_last_lr()[0], "elapsed_s": time.time() - started})
        out_of_time = args.max_train_minutes is not None and (time.time() - started) > 60 * args.max_train_minutes
        if done % args.checkpointing_steps == 0 or out_of_time:
            _save_checkpoint(accelerator, args, done, config, tokenizer)
        if val_rows is not None and (done % args.eval_steps == 0 or done == args.max_train_steps or out_of_time):
            metrics = evaluate_model(accelerator.unwrap_model(model), val_rows, scheduler, args, tokenizer)
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
        _save_pipeline(accelerator.unwrap_model(model), scheduler, tokenizer, args, final)
    accelerator.wait_for_everyone()
    return final


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
            state = {"step": step, "model_config": _config_signature(config)}
            json.dump({**state, "tokenizer_sha256": _tokenizer_fingerprint(tokenizer)}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoint_dirs(args.output_dir)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def evaluate_model(model: Any, rows: torch.Tensor, scheduler: Any, args: Any, tokenizer: Any) -> dict[str, Any]:
    """Validation CE loss, the ELBO perplexity bound and a few unconditional samples.

    The bound: ``-log p(x1) <= int_0^1 sum_i GKL_i(t) dt`` (DFM_NOTES.md); estimated with ``t`` stratified over
    ``[0, 1 - 1e-3]`` on ``--eval_batches`` batches, divided by the number of tokens: ``ppl_bound = exp(bound)``.
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
        chunk = rows[(b * bs) % len(rows) :][:bs]
        collator.generator = torch.Generator().manual_seed(10_000 + b)
        batch = {k: v.to(device) for k, v in collator(chunk).items() if isinstance(v, torch.Tensor)}
        out = model(input_ids=batch["input_ids"], timesteps=batch["timesteps"], attention_mask=batch["attention_mask"])
        scored = batch["labels"] != -100
        ce = torch.nn.functional.cross_entropy(out.logits[scored].float(), batch["labels"][scored], reduction="sum")
        ce_total += ce.item()
        rate = kappa_rate(batch["timesteps"], scheduler.schedule).view(-1, 1)
        n_tok = chunk.numel()
        elbo_total += generalized_kl_loss(
            out.logits, batch["labels"], batch["input_ids"], rate, num_items_in_batch=1
        ).item()
        tokens += n_tok
        ce_count += int(scored.sum())
    bound = elbo_total / tokens
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


def _save_pipeline(model: Any, scheduler: Any, tokenizer: Any, args: argparse.Namespace, final: dict) -> None:
    from ..hub import write_training_card
    from ..pipelines import DFMPipeline

    model = model.to(torch.float32).eval()
    pipe = DFMPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    pipe.save_pretrained(args.output_dir)
    write_training_card(args.output_dir, vars(args), final)


if __name__ == "__main__":
    main()
