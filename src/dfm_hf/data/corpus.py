"""Corpora for DFM training: local files through `datasets`, the stdlib code corpus, and packing into blocks."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from typing import Any, Optional

SOURCE_SUFFIXES = (".py", ".pyi", ".txt", ".md", ".rst")
_LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".gz": "json"}


def stdlib_python_files(include_tests: bool = False) -> list[str]:
    """Every ``*.py`` file of the running interpreter's standard library that is valid UTF-8 (sorted).

    ``include_tests=False`` leaves out ``test``/``tests``/``idle_test`` folders and ``site-packages``.
    """
    root = os.path.dirname(os.__file__)
    out = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        parts = os.path.relpath(path, root).split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if not include_tests and any(p in ("test", "tests", "idle_test") for p in parts[:-1]):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                f.read()
        except (UnicodeDecodeError, OSError):
            continue
        out.append(path)
    return out


def split_by_file(files: Sequence[str], validation_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by file (hash of the path relative to its library root)."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must lie in [0, 1), got {validation_fraction!r}.")
    root = os.path.dirname(os.__file__)
    train, val = [], []
    for f in files:
        key = os.path.relpath(f, root) if f.startswith(root) else os.path.basename(f)
        bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if bucket < validation_fraction else train).append(f)
    return train, val


def expand_data_files(paths: Sequence[str], argument: str = "--train_file") -> list[str]:
    """Expand files and directories (recursively: source and text files) into a sorted list of files.

    Raises ``ValueError`` naming ``argument`` for a missing path or when nothing is found.
    """
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = [
                f
                for f in sorted(glob.glob(os.path.join(p, "**", "*"), recursive=True))
                if os.path.isfile(f) and f.endswith(SOURCE_SUFFIXES + tuple(_LOADERS))
            ]
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ValueError(f"`{argument}`: {p!r} does not exist.")
    if not files:
        raise ValueError(f"`{argument}`: no data files found in {list(paths)}.")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if len(empty) == len(files):
        raise ValueError(f"`{argument}`: every data file is empty ({empty[:3]}...).")
    return files


def load_text_dataset(files: Sequence[str], text_column: str = "text", streaming: bool = False) -> Any:
    """Load files as a ``datasets`` dataset with one document per row in ``text_column``.

    json/jsonl(.gz)/parquet files are read with their own loader (``text_column`` must exist); text and source
    files are read whole (one document per file) so code keeps its structure.
    """
    import datasets

    files = [f for f in files if os.path.getsize(f) > 0]
    kinds = {_kind(f) for f in files}
    if len(kinds) != 1:
        raise ValueError(f"`--train_file`: mix of file kinds {sorted(kinds)}; pass one kind at a time.")
    kind = kinds.pop()
    if kind == "document":
        ds = datasets.load_dataset(
            "text", data_files=list(files), sample_by="document", split="train", streaming=streaming
        )
        if text_column != "text":
            ds = ds.rename_column("text", text_column)
    else:
        ds = datasets.load_dataset(kind, data_files=list(files), split="train", streaming=streaming)
        names = ds.column_names if not streaming else (ds.column_names or [text_column])
        if text_column not in names:
            raise ValueError(f"`--text_column` {text_column!r} is not a column of the data; columns: {names}.")
    return ds


def _kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        return "json"
    if lower.endswith(".parquet"):
        return "parquet"
    return "document"


def pack_dataset(
    ds: Any, tokenizer: Any, seq_len: int, text_column: str = "text", num_proc: Optional[int] = None
) -> Any:
    """Tokenize and pack documents into ``seq_len`` blocks, an EOS between documents (the remainder is dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("`tokenizer` needs an eos token to separate packed documents.")

    def tokenize_and_pack(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        flat: list[int] = []
        for doc in ids:
            flat.extend(doc)
            flat.append(eos)
        n = len(flat) // seq_len
        return {"input_ids": [flat[i * seq_len : (i + 1) * seq_len] for i in range(n)]}

    columns = ds.column_names
    kwargs: dict[str, Any] = {"batched": True, "batch_size": 64, "remove_columns": columns}
    if num_proc and not getattr(ds, "_ex_iterable", None):
        kwargs["num_proc"] = num_proc
    return ds.map(tokenize_and_pack, **kwargs)
