"""Generative perplexity of texts under a judge causal LM, and the unigram token entropy of each text."""

import math

import datasets
import evaluate
import numpy as np
import torch

_DESCRIPTION = """\
Generative perplexity, the usual sample-quality check of discrete diffusion / flow language models: each text
is re-tokenized with the judge model's tokenizer and scored by the judge, a causal LM. Per text, perplexity is
exp(mean negative log-likelihood of its tokens). If add_start_token is on and the tokenizer has a BOS token, it
is prepended, so that every token of the text is scored; otherwise the first token has no context and is not
scored. Texts longer than the judge's context are scored with a sliding window: windows of max_length tokens
moved by stride tokens, each token scored once, with at least max_length - stride tokens of context after the
first window. Also returned: mean_entropy, the mean over texts of the entropy (natural log) of the empirical
distribution of the text's token ids under the judge tokenizer; a low value flags repetitive samples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of texts (strings).
    model_id: path (or name in the local cache) of a causal LM, loaded with AutoModelForCausalLM and
        AutoTokenizer; or give `model` and `tokenizer` instead.
    gguf_file: GGUF file inside model_id to load (dequantized to float32).
    model: a causal LM object (e.g. from dfm_hf.evaluation.judge.load_smollm2_judge()); needs `tokenizer`.
    tokenizer: the tokenizer matching `model`.
    batch_size: windows scored per forward pass (default 8).
    add_start_token: prepend the tokenizer's BOS token when it has one (default True).
    max_length: context window in tokens (default: the model config's max_position_embeddings).
    stride: how far the window moves, 1 <= stride < max_length (default max_length // 2).
    device: where to run (default: the model's device; cuda if available for a loaded model_id).
Returns:
    {"perplexities": [float per text], "mean_perplexity": float, "mean_entropy": float}
Examples:
    >>> metric = dfm_hf.evaluation.metrics.load("generative_perplexity")
    >>> model, tokenizer = dfm_hf.evaluation.judge.load_smollm2_judge()
    >>> out = metric.compute(predictions=["The cat sat on the mat."], model=model, tokenizer=tokenizer)
"""


def unigram_entropy(token_ids) -> float:
    """Entropy in nats of the empirical distribution of ``token_ids``: ``-sum_v p_v log p_v``."""
    ids = np.asarray(token_ids)
    if ids.size == 0:
        raise ValueError("token_ids must not be empty")
    _, counts = np.unique(ids, return_counts=True)
    probs = counts / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def sliding_windows(length: int, max_length: int, stride: int) -> list:
    """Windows ``(begin, end, n_new)`` over ``length`` tokens: the last ``n_new`` tokens of each are scored."""
    windows, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + max_length, length)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end >= length:
            return windows
        begin += stride


def _context_length(model) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    raise ValueError("max_length must be given: the model config tells no context length")


@torch.inference_mode()
def score_token_ids(model, sequences, max_length: int, stride: int, batch_size: int, device, pad_id: int = 0):
    """Sum of token negative log-likelihoods and number of scored tokens of each id sequence.

    Token ``j >= 1`` of a sequence is scored given the tokens before it in its window (token 0 has no context).
    """
    windows = []
    for index, ids in enumerate(sequences):
        for begin, end, n_new in sliding_windows(len(ids), max_length, stride):
            windows.append((index, ids[begin:end], n_new))
    nll_sums = np.zeros(len(sequences), dtype=np.float64)
    counts = np.zeros(len(sequences), dtype=np.int64)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (_, ids, n_new) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
            scored[row, max(1, len(ids) - n_new) : len(ids)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        logits = logits[:, :-1].float()
        targets = input_ids[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        nll = (nll.double().cpu() * scored[:, 1:]).sum(dim=1)
        n_scored = scored[:, 1:].sum(dim=1)
        for row, (index, _, _) in enumerate(chunk):
            nll_sums[index] += float(nll[row])
            counts[index] += int(n_scored[row])
    return nll_sums, counts


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GenerativePerplexity(evaluate.Metric):
    """Perplexity of texts under a judge causal LM (sliding window) and their mean unigram token entropy."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _load_model(self, model_id, gguf_file, device):
        cache = self.__dict__.setdefault("_judge_cache", {})
        key = (model_id, gguf_file, str(device))
        if key not in cache:
            import transformers

            kwargs = {}
            if gguf_file is not None:
                kwargs = {
                    "gguf_file": gguf_file,
                    "dtype": torch.float32,
                    "quantization_config": transformers.GgufConfig(dequantize=True),
                }
            model = transformers.AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
            tok_kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_id, **tok_kwargs)
            cache.clear()
            cache[key] = (model.to(device).eval(), tokenizer)
        return cache[key]

    def _compute(
        self,
        predictions,
        model_id=None,
        gguf_file=None,
        model=None,
        tokenizer=None,
        batch_size=8,
        add_start_token=True,
        max_length=None,
        stride=None,
        device=None,
    ):
        """Score every text; see the module's inputs description."""
        if len(predictions) == 0:
            raise ValueError("predictions must hold at least one text, got an empty list")
        if (model_id is None) == (model is None):
            raise ValueError("give exactly one of model_id (a path) or model (an object, with tokenizer)")
        if model is not None and tokenizer is None:
            raise ValueError("tokenizer must be given together with model")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if model_id is not None:
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model, tokenizer = self._load_model(model_id, gguf_file, device)
        elif device is None:
            device = next(model.parameters()).device
        if max_length is None:
            max_length = _context_length(model)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if stride is None:
            stride = max_length // 2
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < max_length:
            raise ValueError(f"stride must be an int with 1 <= stride < max_length ({max_length}), got {stride!r}")

        text_ids = [list(ids) for ids in tokenizer(list(predictions), add_special_tokens=False)["input_ids"]]
        bos = getattr(tokenizer, "bos_token_id", None) if add_start_token else None
        sequences = [([bos] + ids) if bos is not None else ids for ids in text_ids]
        for i, seq in enumerate(sequences):
            if len(seq) < 2:
                raise ValueError(
                    f"predictions[{i}] has no token to score ({len(text_ids[i])} token(s) "
                    f"{'and a BOS token' if bos is not None else 'and no BOS token'})"
                )
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            nll_sums, counts = score_token_ids(model, sequences, max_length, stride, batch_size, device, pad_id)
        finally:
            if was_training:
                model.train()
        perplexities = [math.exp(s / c) for s, c in zip(nll_sums.tolist(), counts.tolist())]
        entropies = [unigram_entropy(ids) for ids in text_ids]
        return {
            "perplexities": perplexities,
            "mean_perplexity": float(np.mean(perplexities)),
            "mean_entropy": float(np.mean(entropies)),
        }
