"""The rows each process trains on: packed or SFT data, and the batch plan that makes every batch reproducible.

Batches are a pure function of (seed, step, micro-step, rank): process ``r`` of ``W`` at micro-step ``m`` of
optimizer step ``s`` reads rows ``((s * A + m) * W + r) * B ...`` of the epoch's permutation (:class:`BatchPlan`), and
its corruption (t, couplings, x_t) and, with attention annealing, its attention mask are drawn from generators seeded
by the same global index (:func:`draw_micro_batch`). So two processes with accumulation A see exactly the global batch
one process sees with accumulation 2A, and a resumed run continues with the very batches the uninterrupted run would
have used.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any, Optional

import torch

from .collator import DFMDataCollator, annealed_attention_mask

__all__ = [
    "BatchPlan",
    "StreamedRows",
    "annealing_seed",
    "collator_seed",
    "data_files",
    "draw_micro_batch",
    "load_rows",
    "load_sft_rows",
    "make_collator",
]


class BatchPlan:
    """Rows of each (step, micro-step, rank) as a pure function of the seed (see the module docstring).

    Args:
        num_rows: rows of the packed data (None: a stream, see :class:`StreamedRows`).
        batch_size: rows per process and micro-step; accumulation: micro-steps per step; world: processes.
        seed: the run's seed (the permutation of epoch ``e`` is drawn from ``seed * 1000 + e``).
    """

    def __init__(self, num_rows: Optional[int], batch_size: int, accumulation: int, world: int, seed: int) -> None:
        self.n, self.bs, self.acc, self.world, self.seed = num_rows, batch_size, accumulation, world, seed
        self._perm_epoch, self._perm = -1, None

    def global_index(self, step: int, micro: int, rank: int) -> int:
        """The position of micro-batch (step, micro, rank) in the run: ``(step * A + micro) * W + rank``."""
        return (step * self.acc + micro) * self.world + rank

    def rows(self, step: int, micro: int, rank: int) -> list[int]:
        """The row indices of micro-batch (step, micro, rank)."""
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


def make_collator(
    scheduler: Any,
    args: argparse.Namespace,
    tokenizer: Any,
    return_clean_ids: bool = False,
    fim_token_ids: Optional[dict[str, int]] = None,
) -> DFMDataCollator:
    """The training collator: the scheduler's path, ``--coupling``, ``--time_sampling``, ``--complementary_masks``
    and ``--fim_rate`` (with the model's ``fim_token_ids``); ``return_clean_ids`` for a block-diffusion model (the
    clean half of its input)."""
    fim_rate = float(getattr(args, "fim_rate", 0.0))
    if fim_rate and fim_token_ids is None:
        raise ValueError("`--fim_rate` needs a model that declares FIM tokens (`config.fim_token_ids`).")
    return DFMDataCollator(scheduler=scheduler, coupling=args.coupling_spec, time_sampling=args.time_sampling,
                           pad_token_id=tokenizer.pad_token_id,
                           complementary_masks=bool(getattr(args, "complementary_masks", False)),
                           return_clean_ids=return_clean_ids, fim_rate=fim_rate,
                           fim_token_ids=fim_token_ids if fim_rate else None)  # fmt: skip


def collator_seed(seed: int, global_index: int) -> int:
    """Seed of the corruption (t, couplings, x_t) of micro-batch ``global_index``."""
    return seed * 7_919 + global_index


def annealing_seed(seed: int, global_index: int) -> int:
    """Seed of the annealed attention mask of micro-batch ``global_index`` (a stream apart from the collator's)."""
    return collator_seed(seed, global_index) + (1 << 40)


def draw_micro_batch(
    collator: DFMDataCollator,
    plan: BatchPlan,
    rows: Any,
    step: int,
    micro: int,
    rank: int,
    seed: int,
    visible_fraction: float = 1.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The collated micro-batch (step, micro, rank) and its attention mask, drawn from generators seeded by its
    global index: the plain ``(batch, len)`` padding mask when ``visible_fraction`` is 1, else the 4-D annealed mask
    (:func:`~dfm_hf.training.collator.annealed_attention_mask`)."""
    g_index = plan.global_index(step, micro, rank)
    collator.generator = torch.Generator().manual_seed(collator_seed(seed, g_index))
    batch = collator(rows[plan.rows(step, micro, rank)])
    attention = batch["attention_mask"]
    if visible_fraction < 1.0:  # bidirectional from the end of the annealing on: the plain padding mask
        attention = annealed_attention_mask(
            attention, visible_fraction, torch.Generator().manual_seed(annealing_seed(seed, g_index))
        )
    return batch, attention
