"""Training throughput: tokens/s of our training step vs a transformers ``BertForMaskedLM`` of the same shape.

One step = collate a batch of clean rows with ``DFMDataCollator`` (t, x_t, labels) -> forward with labels -> backward
-> AdamW step. Both models run this same loop on the same rows (each with its own collator, seeded alike, so both see
identical batches), alternately in one process; timings are medians of ``--steps`` rounds after ``--warmup`` rounds.
Our step is the one ``train.py`` runs: the LM head only at the positions the loss reads (``logits_to_keep``).

Comparisons (``ours / theirs`` in tokens/s):

- ``same config`` (target >= 0.9): BERT with the same width, depth, heads, intermediate size and vocabulary. Our gated
  SiLU MLP has three ``hidden x intermediate`` matrices where BERT's GELU MLP has two, so at equal
  ``intermediate_size`` ours does more matmul work per token (the ``#`` line before it gives the FLOP ratio).
- ``same config, our head on all positions`` (INFO): ours computing logits everywhere, as BERT does.
- ``BERT at equal MLP params`` (INFO): BERT's intermediate size x 1.5, the MLP parameter count of ours.

    python benchmarks/train_throughput.py --hidden_size 128 --num_layers 2 --seq_len 64 --batch_size 8 --steps 15
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_parser, emit, print_header, setup, time_alternating  # noqa: E402

TARGET = 0.9
IGNORE_INDEX = -100


def build_parser() -> Any:
    """``--hidden_size --num_layers --num_heads --intermediate_size --vocab_size --seq_len --batch_size --steps``."""
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=None, help="default: hidden_size / 64 (at least 1)")
    p.add_argument("--intermediate_size", type=int, default=None, help="default: 11/4 x hidden_size, rounded to 8")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each model (alternating; medians)")
    p.add_argument("--warmup", type=int, default=3)
    return p


def ours_model(a: Any, device: str) -> torch.nn.Module:
    """``DFMForMaskedGeneration`` (no time conditioning, tied head, SDPA)."""
    from dfm_hf.models import DFMConfig, DFMForMaskedGeneration

    config = DFMConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
                       num_attention_heads=a.num_heads, intermediate_size=a.intermediate_size,
                       max_position_embeddings=max(512, a.seq_len), mask_token_id=a.vocab_size - 1, pad_token_id=0,
                       time_conditioning=False, attn_implementation="sdpa")  # fmt: skip
    return DFMForMaskedGeneration(config).to(device).train()


def bert_model(a: Any, device: str, intermediate_size: int) -> torch.nn.Module:
    """``BertForMaskedLM`` of the same shape (no dropout, like ours; SDPA attention)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
                        num_attention_heads=a.num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max(512, a.seq_len), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0, attn_implementation="sdpa")  # fmt: skip
    return BertForMaskedLM(config).to(device).train()


def make_step(
    model: torch.nn.Module, rows: torch.Tensor, a: Any, device: str, dfm: bool, head_on_scored: bool = True
) -> Callable[[], Any]:
    """A closure running one training step (collate -> forward -> backward -> AdamW) on ``rows``.

    ``head_on_scored``: our LM head runs only where the loss reads logits (``logits_to_keep``), as ``train.py`` does.
    """
    from dfm_hf.training import DFMDataCollator

    collator = DFMDataCollator(mask_token_id=a.vocab_size - 1, vocab_size=a.vocab_size, time_sampling="stratified")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    state = {"calls": 0}

    def step() -> Any:
        collator.generator = torch.Generator().manual_seed(a.seed + state["calls"])  # same batches for both models
        state["calls"] += 1
        batch = {k: v.to(device, non_blocking=True) for k, v in collator(rows).items()}
        if dfm:
            keep = batch["labels"] != IGNORE_INDEX if head_on_scored else None
            out = model(input_ids=batch["input_ids"], timesteps=batch["timesteps"], labels=batch["labels"],
                        attention_mask=batch["attention_mask"], logits_to_keep=keep)  # fmt: skip
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss

    return step


def matmul_flop_ratio(a: Any, bert_intermediate: int) -> float:
    """Weight-matmul FLOPs per token, ours over BERT's, with the head on every position (attention scores equal)."""
    h, i, v = a.hidden_size, a.intermediate_size, a.vocab_size
    ours = a.num_layers * (4 * h * h + 3 * h * i) + h * v
    theirs = a.num_layers * (4 * h * h + 2 * h * bert_intermediate) + h * h + h * v
    return ours / theirs


def main(argv: list[str] | None = None) -> None:
    """Print the header and one line per comparison."""
    a = build_parser().parse_args(argv)
    if a.quick:
        a.hidden_size, a.num_layers, a.vocab_size, a.seq_len, a.batch_size, a.steps = 64, 2, 512, 32, 4, 5
    setup(a)
    a.num_heads = a.num_heads or max(1, a.hidden_size // 64)
    a.intermediate_size = a.intermediate_size or max(8, round(a.hidden_size * 11 / 4 / 8) * 8)
    device = a.device
    names = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "seq_len", "batch_size")
    settings = {k: getattr(a, k) for k in names + ("steps", "warmup")}
    print_header("training throughput: DFMForMaskedGeneration vs BertForMaskedLM (collate+fwd+bwd+AdamW)", device,
                 settings)  # fmt: skip
    g = torch.Generator().manual_seed(a.seed)
    rows = torch.randint(3, a.vocab_size - 1, (a.batch_size, a.seq_len), generator=g)
    tokens = a.batch_size * a.seq_len

    torch.manual_seed(a.seed)
    ours = ours_model(a, device)
    comparisons = {  # name: (BERT intermediate size, our head only on scored positions, target)
        "same config": (a.intermediate_size, True, (">=", TARGET)),
        "same config, our head on all positions": (a.intermediate_size, False, (None, None)),
        "BERT at equal MLP params": (a.intermediate_size * 3 // 2, True, (None, None)),
    }
    for what, (bert_intermediate, head_on_scored, target) in comparisons.items():
        theirs = bert_model(a, device, bert_intermediate)
        print(f"# {what}: params ours {sum(p.numel() for p in ours.parameters()):,}, "
              f"BERT {sum(p.numel() for p in theirs.parameters()):,}; weight-matmul FLOPs/token ours/BERT "
              f"{matmul_flop_ratio(a, bert_intermediate):.3f} (head on all positions)")  # fmt: skip
        steps = {
            "ours": make_step(ours, rows, a, device, dfm=True, head_on_scored=head_on_scored),
            "theirs": make_step(theirs, rows, a, device, dfm=False),
        }
        timing = time_alternating(steps, device, rounds=a.steps, warmup=a.warmup)
        ratio = 1.0 / timing.ratios["theirs"]  # tokens/s ratio: the median over rounds of t_theirs / t_ours
        ours_tps, theirs_tps = tokens / timing.times["ours"], tokens / timing.times["theirs"]
        emit(f"train step tokens/s, {what}", f"{ours_tps:,.0f} tok/s", f"{theirs_tps:,.0f} tok/s", ratio, *target)
        del theirs


if __name__ == "__main__":
    main()
