"""Train the autoregressive baseline of the bundled DFM model: a GPT-2 of the same width, depth and vocabulary.

Same data (this interpreter's standard library, the same by-file split), same tokenizer, same packing into
``--seq_len`` blocks, the very same rows at each step (``dfm_hf.training.batches.BatchPlan`` with the same seed),
and the optimiser, learning rate and schedule of ``examples/train_bundled_model.sh``. Only the objective differs:
next-token cross-entropy with a causal model instead of the DFM denoising loss.

    python examples/train_ar_baseline.py --tokenizer_name_or_path src/dfm_hf/bundled/dfm-code-stdlib/tokenizer \\
        --max_train_steps 2000 --output_dir runs/ar-baseline

The MLP width defaults to 1056 so that GPT-2's plain MLP (2 * d * 1056 weights) has as many weights as the DFM
model's gated MLP (3 * d * 704). Snapshots ``<output_dir>/step-<k>/`` (model + tokenizer, loadable with
``AutoModelForCausalLM``) are written every ``--save_steps``; ``<output_dir>/final/`` at the end; the validation
perplexity on the first ``--eval_batches`` x ``--train_batch_size`` held-out blocks (the rows the DFM training script
scores for its ELBO bound) goes to ``<output_dir>/metrics.jsonl``. A run restarts from its newest snapshot.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import time
from typing import Any, Optional

import torch


def build_parser() -> argparse.ArgumentParser:
    """Flags; the defaults are those of ``examples/train_bundled_model.sh``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--tokenizer_name_or_path", default=None, help="default: train the BPE as train.py does")
    p.add_argument("--tokenizer_vocab_size", type=int, default=4096)
    p.add_argument("--validation_fraction", type=float, default=0.05)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--num_attention_heads", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=1056)
    p.add_argument("--max_position_embeddings", type=int, default=512)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--max_train_minutes", type=float, default=None)
    p.add_argument("--save_steps", type=int, default=250)
    p.add_argument("--eval_steps", type=int, default=500)
    p.add_argument("--eval_batches", type=int, default=16)
    p.add_argument("--logging_steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume_from", default=None, help="a step-<k> snapshot (default: the newest one, if any)")
    return p


def _snapshots(output_dir: str) -> list[tuple[int, str]]:
    found = []
    for d in glob.glob(os.path.join(output_dir, "step-*")):
        tail = d.rsplit("-", 1)[-1]
        if tail.isdigit() and os.path.isfile(os.path.join(d, "train_state.pt")):
            found.append((int(tail), d))
    return sorted(found)


@torch.no_grad()
def validation_ppl(model: Any, rows: torch.Tensor, batch_size: int, batches: int) -> dict[str, float]:
    """Mean next-token NLL and perplexity on the first ``batches * batch_size`` rows."""
    model.eval()
    total, count = 0.0, 0
    for b in range(min(batches, math.ceil(len(rows) / batch_size))):
        chunk = rows[b * batch_size : (b + 1) * batch_size]
        logits = model(input_ids=chunk).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="sum")
        total += nll.item()
        count += chunk[:, 1:].numel()
    model.train()
    return {"val_nll": total / count, "val_ppl": math.exp(total / count)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Train and return the final metrics."""
    args = build_parser().parse_args(argv)
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, get_scheduler

    from dfm_hf.data.corpus import load_text_dataset, pack_dataset, split_by_file, stdlib_python_files
    from dfm_hf.data.tokenizer import train_bpe_tokenizer
    from dfm_hf.training.batches import BatchPlan

    torch.manual_seed(args.seed)
    train_files, val_files = split_by_file(stdlib_python_files(), args.validation_fraction)
    if args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    else:
        texts = load_text_dataset(train_files)["text"]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.tokenizer_vocab_size)
    train_rows = torch.tensor(pack_dataset(load_text_dataset(train_files), tokenizer, args.seq_len)["input_ids"])
    val_rows = torch.tensor(pack_dataset(load_text_dataset(val_files), tokenizer, args.seq_len)["input_ids"])

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.max_position_embeddings,
        n_embd=args.hidden_size,
        n_layer=args.num_hidden_layers,
        n_head=args.num_attention_heads,
        n_inner=args.intermediate_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, betas=(0.9, 0.95)
    )
    lr_sched = get_scheduler(
        "constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_train_steps
    )
    os.makedirs(args.output_dir, exist_ok=True)
    start = 0
    snaps = _snapshots(args.output_dir)
    if args.resume_from is not None:
        wanted = os.path.normpath(args.resume_from)
        snaps = [(k, d) for k, d in snaps if os.path.normpath(d) == wanted]
        if not snaps:
            raise ValueError(f"`--resume_from` {args.resume_from!r} is not a complete snapshot of --output_dir")
    if snaps:
        start, path = snaps[-1]
        if start > args.max_train_steps:
            raise ValueError(f"snapshot {path} is past --max_train_steps={args.max_train_steps}; pick --resume_from")
        model = GPT2LMHeadModel.from_pretrained(path)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, betas=(0.9, 0.95)
        )
        lr_sched = get_scheduler(
            "constant_with_warmup",
            optimizer,
            num_warmup_steps=args.warmup_steps,
            num_training_steps=args.max_train_steps,
        )
        state = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        print(f"resumed from {path} at step {start}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    plan = BatchPlan(len(train_rows), args.train_batch_size, 1, 1, args.seed)
    log_path = os.path.join(args.output_dir, "metrics.jsonl")

    def log(record: dict[str, Any]) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    def snapshot(step: int, name: str) -> None:
        final = os.path.join(args.output_dir, name)
        tmp = os.path.join(args.output_dir, f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(), "step": step}
        torch.save(state, os.path.join(tmp, "train_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    log({"step": start, "event": "start", "params": n_params, "train_rows": len(train_rows), "args": vars(args)})
    t0, loss, done = time.time(), float("nan"), start
    model.train()
    for step in range(start, args.max_train_steps):
        batch = train_rows[plan.rows(step, 0, 0)]
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        loss, done = out.loss.item(), step + 1
        if done % args.logging_steps == 0 or done == 1:
            log({"step": done, "loss": loss, "lr": lr_sched.get_last_lr()[0], "elapsed_s": time.time() - t0})
        if done % args.eval_steps == 0:
            log({"step": done, **validation_ppl(model, val_rows, args.train_batch_size, args.eval_batches)})
        if done % args.save_steps == 0:
            snapshot(done, f"step-{done}")
        if args.max_train_minutes is not None and time.time() - t0 > 60 * args.max_train_minutes:
            break
    final = {"step": done, "train_loss": loss, **validation_ppl(model, val_rows, args.train_batch_size, 16)}
    snapshot(done, f"step-{done}")
    snapshot(done, "final")
    log(final)
    return final


if __name__ == "__main__":
    main()
