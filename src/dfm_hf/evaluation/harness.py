"""Evaluate dfm_hf pipelines with EleutherAI's lm-evaluation-harness: :class:`DFMLM`, registered as ``"dfm_hf"``.

    import lm_eval
    from dfm_hf.evaluation.harness import DFMLM, task_manager
    lm = DFMLM(pretrained="path/or/hub-id", mc_num=128, gen_length=256, num_inference_steps=256)
    results = lm_eval.simple_evaluate(model=lm, tasks=["stdlib_next_line"], task_manager=task_manager())

    dfm-hf lm-eval --model_args pretrained=path/or/hub-id,mc_num=32 --tasks stdlib_next_line --limit 50

Importing this module registers the model with lm-eval; ``import dfm_hf`` alone never imports lm-eval (an optional
extra). Request types:

* ``loglikelihood`` / ``loglikelihood_rolling`` (multiple choice, perplexity): a Monte-Carlo estimate of the ELBO of
  a masked discrete flow / diffusion model, a lower bound on the log-likelihood, NOT the exact log-likelihood
  (which such models do not give in closed form). The estimate is unbiased for the bound. See :meth:`DFMLM.elbo_draws`.
* ``generate_until``: :class:`~dfm_hf.DFMPipeline` with the pipeline's scheduler or a named preset, cut at the task's
  stop sequences and at EOS.

The shipped offline tasks (``humaneval_local``, ``stdlib_next_line``) live in :data:`TASKS_PATH`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dfm_hf.evaluation.harness needs EleutherAI's lm-evaluation-harness: pip install 'dfm-hf[eval]' "
        "(or pip install lm-eval)"
    ) from err

from tqdm.auto import tqdm

from .. import paths
from ..pipelines import DFMPipeline
from .lm_eval_tasks import TAG, TASK_NAMES, TASKS_PATH
from .tasks import decode_generated, row_seed, truncate_completion

__all__ = ["DTYPES", "DFMLM", "ESTIMATORS", "TASK_NAMES", "TASKS_PATH", "cli_main", "task_manager"]

logger = logging.getLogger(__name__)

#: ``estimator=`` values: ``"count"`` (LLaDA's mask count, the default) and ``"ratio"`` (mask ratio ``t ~ U(0, 1]``).
ESTIMATORS = ("count", "ratio")
#: ``dtype=`` values (None and "auto" keep the checkpoint's dtype).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: ``gen_kwargs`` keys of lm-eval tasks that ``generate_until`` reads (others are ignored with a warning).
GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p")
#: Rows of the log-softmax computed at once (bounds the float32 copy of the kept logits).
_LOGSOFTMAX_ROWS = 4096


def task_manager(include_defaults: bool = True, **kwargs: Any) -> Any:
    """An ``lm_eval.tasks.TaskManager`` that also knows the shipped tasks (``include_path=TASKS_PATH``).

    ``include_defaults=False`` skips indexing lm-eval's own ~15k task files (about 10 s).
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=TASKS_PATH, include_defaults=include_defaults, **kwargs)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode()).hexdigest()[:32]


def _optional_base(hint: Any) -> tuple[Any, bool]:
    """``(base type, accepts None)`` of a type hint such as ``Optional[int]``."""
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else None), type(None) in typing.get_args(hint)
    return hint, False


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the annotated type of argument ``name`` (lm-eval's CLI passes strings)."""
    base, nullable = _optional_base(hint)
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and nullable:
        return None
    if value is None:
        if nullable:
            return None
        raise ValueError(f"`{name}` must not be None.")
    try:
        if base is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if base is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(base, base)
        raise ValueError(f"`{name}` must be {'None or ' if nullable else ''}{kind}, got {value!r}.") from None
    return value


@register_model("dfm_hf")
class DFMLM(LM):
    """lm-eval model for any :class:`~dfm_hf.DFMPipeline` (masked source): ELBO likelihoods, pipeline generation.

    Args:
        pretrained: a folder or Hub repo id that ``DFMPipeline.from_pretrained`` loads, or a ``DFMPipeline``.
        mc_num: Monte-Carlo draws per scored window (loglikelihood); the standard error shrinks as
            ``1 / sqrt(mc_num)``.
        batch_size: model rows per forward pass (ELBO draws of several requests share a batch; generation rows).
        num_inference_steps: sampler steps of ``generate_until``.
        gen_length: tokens generated per request (the canvas of masks); a task's ``max_gen_toks`` caps it.
        block_length: LLaDA's semi-autoregressive block length, set on the scheduler config (the scheduler must
            have a ``block_length`` key, e.g. the ``confidence`` presets); None keeps the scheduler's.
        guidance_scale: classifier-free guidance scale passed to the pipeline (only when it is not 1.0).
        scheduler_preset: name of one of the pipeline's scheduler presets; None keeps its scheduler.
        temperature: sampling temperature for every request; None follows the task (``do_sample=False``: 0.0, i.e.
            greedy token choices; a task ``temperature`` otherwise) and else the scheduler's own.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (default: CUDA when available).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, or None / ``"auto"`` for the checkpoint's.
        seed: base seed; every draw comes from a generator seeded by (seed, request), so results do not depend on
            the batch size or on the other requests.
        estimator: ``"count"`` (LLaDA's, the default for models that do not read the time) or ``"ratio"`` (the
            default for time-conditioned models); see :meth:`elbo_draws`.
        max_length: positions used per window (default and maximum: the model's ``max_position_embeddings``). Set
            it to the training sequence length of a model trained on shorter windows than its positions (the
            bundled model: 128), whose likelihoods degrade on longer inputs.
        revision: Hub revision for ``pretrained``.
        max_batch_size, trust_remote_code: accepted because lm-eval's CLI passes them; unused.

    Raises:
        ValueError: an unknown argument or a bad value (named, with the accepted values), an unknown preset, a
            scheduler without ``block_length``, a pipeline that does not take ``guidance_scale``.
    """

    def __init__(
        self,
        pretrained: Union[str, DFMPipeline, None] = None,
        mc_num: int = 128,
        batch_size: int = 32,
        num_inference_steps: int = 64,
        gen_length: int = 256,
        block_length: Optional[int] = None,
        guidance_scale: float = 1.0,
        scheduler_preset: Optional[str] = None,
        temperature: Optional[float] = None,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        seed: int = 0,
        estimator: Optional[str] = None,
        max_length: Optional[int] = None,
        revision: Optional[str] = None,
        max_batch_size: Optional[int] = None,
        trust_remote_code: Optional[bool] = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            accepted = sorted(p for p in inspect.signature(DFMLM.__init__).parameters if p not in ("self", "unknown"))
            raise ValueError(f"unknown DFMLM argument(s) {sorted(unknown)}; accepted: {accepted}.")
        args = _coerce_all(dict(locals()))
        for name in ("mc_num", "batch_size", "num_inference_steps", "gen_length"):
            if args[name] < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {args[name]!r}.")
        for name in ("block_length", "max_length"):
            if args[name] is not None and args[name] < 1:
                raise ValueError(f"`{name}` must be None or an integer >= 1, got {args[name]!r}.")
        if args["guidance_scale"] < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {args['guidance_scale']!r}.")
        if args["temperature"] is not None and args["temperature"] < 0:
            raise ValueError(f"`temperature` must be None or >= 0, got {args['temperature']!r}.")
        if args["estimator"] is not None and args["estimator"] not in ESTIMATORS:
            raise ValueError(f"`estimator` must be one of {list(ESTIMATORS)}, got {args['estimator']!r}.")
        dtype_name = args["dtype"]
        if dtype_name is not None and dtype_name != "auto" and dtype_name not in DTYPES:
            raise ValueError(f"`dtype` must be None, 'auto' or one of {list(DTYPES)}, got {dtype_name!r}.")
        torch_dtype = DTYPES.get(dtype_name) if dtype_name else None
        if pretrained is None:
            raise ValueError("`pretrained` is required: a pipeline folder, a Hub repo id or a DFMPipeline.")

        pipe = self._load(pretrained, args["revision"], torch_dtype)
        if pipe.tokenizer is None:
            raise ValueError("`pretrained` has no tokenizer; lm-eval passes text, so DFMLM needs one.")
        config = pipe.model.config
        time_conditioned = bool(getattr(config, "time_conditioning", False))
        estimator = args["estimator"] or ("ratio" if time_conditioned else "count")
        if estimator == "count" and time_conditioned:
            raise ValueError(
                "`estimator`='count' holds only for models that do not read the time; this model has "
                "time_conditioning=True: use estimator='ratio'."
            )
        positions = int(config.max_position_embeddings)
        if args["max_length"] is not None and args["max_length"] > positions:
            raise ValueError(f"`max_length` must be <= the model's max_position_embeddings={positions}.")
        # the time a time-conditioned model reads follows the kappa it was trained with: its saved scheduler's
        saved = pipe.scheduler.config
        self._kappa = paths.get_kappa_schedule(
            saved.get("kappa_schedule", "polynomial"), saved.get("kappa_exponent", 1.0)
        )
        scheduler = pipe.scheduler
        scheduler_preset = args["scheduler_preset"]
        if scheduler_preset is not None:
            if scheduler_preset not in pipe.scheduler_presets:
                raise ValueError(
                    f"`scheduler_preset` must be one of this pipeline's presets {sorted(pipe.scheduler_presets)}, "
                    f"got {scheduler_preset!r}."
                )
            preset = pipe.scheduler_presets[scheduler_preset]
            scheduler = type(preset).from_config(preset.config)
        if args["block_length"] is not None:
            if "block_length" not in inspect.signature(type(scheduler).__init__).parameters:
                with_blocks = sorted(
                    n
                    for n, s in pipe.scheduler_presets.items()
                    if "block_length" in inspect.signature(type(s).__init__).parameters
                )
                raise ValueError(
                    f"`block_length` needs a scheduler with a block_length setting; {type(scheduler).__name__} has "
                    f"none. Pick a `scheduler_preset` that has one: {with_blocks}."
                )
            scheduler = type(scheduler).from_config(scheduler.config, block_length=args["block_length"])
        if args["guidance_scale"] != 1.0 and "guidance_scale" not in inspect.signature(pipe.__call__).parameters:
            raise ValueError(
                f"`guidance_scale`={args['guidance_scale']} needs a DFMPipeline that accepts guidance_scale; this "
                "version does not (use guidance_scale=1.0)."
            )
        # a pipeline of our own that shares the modules: a preset or block_length never changes the caller's object
        self.pipe = DFMPipeline(model=pipe.model, scheduler=scheduler, tokenizer=pipe.tokenizer)
        self.pipe.scheduler_presets = dict(pipe.scheduler_presets)
        self.pipe.set_progress_bar_config(disable=True)
        device = args["device"]
        if device is not None or not isinstance(pretrained, DFMPipeline):
            try:
                self.pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            except (AssertionError, RuntimeError, TypeError, ValueError) as e:
                raise ValueError(f"`device` {device!r} cannot be used: {type(e).__name__}: {e}") from e
        self.model = self.pipe.model.eval()
        self.tokenizer = self.pipe.tokenizer
        self._device = next(self.model.parameters()).device
        self.mc_num = args["mc_num"]
        self.batch_size = args["batch_size"]
        self.num_inference_steps = args["num_inference_steps"]
        self.gen_length = args["gen_length"]
        self.block_length = args["block_length"]
        self.guidance_scale = args["guidance_scale"]
        self.scheduler_preset = scheduler_preset
        self.temperature = args["temperature"]
        self.seed = args["seed"]
        self.estimator = estimator
        self.max_length = args["max_length"] or positions
        self.time_conditioned = time_conditioned
        self.mask_token_id = int(self.pipe.mask_token_id)
        self.pretrained_name = pretrained if isinstance(pretrained, str) else pipe.config.get("_name_or_path", "")
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _load(pretrained: Any, revision: Optional[str], dtype: Optional[torch.dtype]) -> DFMPipeline:
        if isinstance(pretrained, DFMPipeline):
            if dtype is not None:
                pretrained.model.to(dtype)
            return pretrained
        if not isinstance(pretrained, str):
            raise ValueError(
                f"`pretrained` must be a folder, a Hub repo id or a DFMPipeline, got {type(pretrained).__name__}."
            )
        pretrained = os.path.expanduser(pretrained)
        kwargs: dict[str, Any] = {}
        if revision:
            kwargs["revision"] = revision
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            return DFMPipeline.from_pretrained(pretrained, **kwargs)
        except Exception as e:  # a missing folder, an unknown Hub id, a broken checkpoint
            raise ValueError(
                f"`pretrained` {pretrained!r} could not be loaded as a DFM pipeline: {type(e).__name__}: {e}"
            ) from e

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def eot_token_id(self) -> Optional[int]:
        """The tokenizer's EOS id (what generation stops at)."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> Optional[int]:
        """Token that conditions an empty context and the start of a rolling text: BOS if any, else EOS, else none."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        """Tokenizer name for lm-eval's request cache when chat templates are used."""
        name = getattr(self.tokenizer, "name_or_path", None) or self.pretrained_name or "dfm_hf"
        return str(name).replace("/", "__")

    def chat_template(self, chat_template: Union[bool, str] = False) -> Optional[str]:
        """The tokenizer's chat template (a name picks one of several), None when not asked for.

        Raises ``ValueError`` when a template is asked for and the tokenizer has none (or not that name).
        """
        if not chat_template:
            return None
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise ValueError(f"`apply_chat_template` must name one of {sorted(template)}, got {name!r}.")
            return template[name]
        if not template:
            raise ValueError(
                "`apply_chat_template` was asked for but this pipeline's tokenizer has no chat template; set "
                "tokenizer.chat_template or run without --apply_chat_template."
            )
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render lm-eval's chat history with the tokenizer's chat template (as text, not ids)."""
        self.chat_template(True)
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict[str, Any]:
        """Facts about the model and the settings, recorded in lm-eval's results ``config``."""
        return {
            "model_name": self.pretrained_name,
            "model_num_parameters": int(sum(p.numel() for p in self.model.parameters())),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "dfm_hf": {
                "estimator": self.estimator,
                "mc_num": self.mc_num,
                "num_inference_steps": self.num_inference_steps,
                "gen_length": self.gen_length,
                "block_length": self.block_length,
                "guidance_scale": self.guidance_scale,
                "scheduler": type(self.pipe.scheduler).__name__,
                "scheduler_preset": self.scheduler_preset,
                "temperature": self.temperature,
                "seed": self.seed,
                "max_length": self.max_length,
            },
        }

    def tok_encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prefix(self) -> list[int]:
        return [] if self.prefix_token_id is None else [int(self.prefix_token_id)]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokenized separately; trailing whitespace of the context moves to the
        continuation (lm-eval's convention); an empty context becomes the prefix token (BOS, else EOS)."""
        stripped = context.rstrip()
        if stripped != context:
            continuation = context[len(stripped) :] + continuation
            context = stripped
        bos = self.tokenizer.bos_token_id
        if not context:
            return self._prefix(), self.tok_encode(continuation)
        head = [int(bos)] if bos is not None else []
        return head + self.tok_encode(context), self.tok_encode(continuation)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ------------------------------------------------------------------ ELBO
    def _check_scoring(self) -> None:
        cfg = self.pipe.scheduler.config
        if cfg.get("source_distribution", "mask") != "mask":
            raise ValueError(
                "loglikelihood requests need a masked model (source_distribution='mask'); this pipeline's scheduler "
                f"has source_distribution={cfg.get('source_distribution')!r}."
            )
        if cfg.get("prediction_type", "sample") != "sample":
            raise ValueError(
                "loglikelihood requests need a model that predicts the data (prediction_type='sample'), got "
                f"{cfg.get('prediction_type')!r}."
            )

    def windows(self, ids: Sequence[int], start: int) -> list[tuple[list[int], int]]:
        """Cut the scoring of ``ids[start:]`` (given ``ids[:start]``) into windows of at most ``max_length`` tokens.

        Returns ``(window ids, first scored index in the window)`` pairs. Each window scores the next ``c`` tokens
        given the ``max_length - c`` tokens before them (fewer at the start of the text), where
        ``c = min(tokens left, max_length - min(tokens before, max_length // 2))``: a text that fits is one window
        with all of its context; a longer one is scored in chunks of half a window, each conditioned on the half
        window before it. The sum of the windows' ELBOs bounds the log-likelihood of the text under the model
        restricted to that context (the chain rule, as lm-eval's rolling windows do for causal LMs).
        """
        length = self.max_length
        ids = list(ids)
        out = []
        a = start
        while a < len(ids):
            c = min(len(ids) - a, length - min(a, length // 2))
            lo = max(0, a + c - length)
            out.append((ids[lo : a + c], a - lo))
            a += c
        return out

    def _time_of_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        """Model time ``t`` with ``1 - kappa_t = ratio`` (mask ratio), by bisection on the scheduler's kappa."""
        lo, hi = torch.zeros_like(ratio), torch.ones_like(ratio)
        target = 1.0 - ratio
        for _ in range(60):
            mid = (lo + hi) / 2
            below = self._kappa.kappa(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def _draw_masks(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(masked (mc_num, n) bool, weight (mc_num,), mask ratio (mc_num,))`` of one window's draws."""
        mc = self.mc_num
        if self.estimator == "count":
            count = torch.randint(1, n + 1, (mc,), generator=generator)
            ranks = torch.rand((mc, n), generator=generator).argsort(1).argsort(1)
            masked = ranks < count[:, None]
            ratio = count.double() / n
            return masked, n / count.double(), ratio
        ratio = 1.0 - torch.rand(mc, generator=generator, dtype=torch.float64)  # in (0, 1]
        masked = torch.rand((mc, n), generator=generator, dtype=torch.float64) < ratio[:, None]
        return masked, 1.0 / ratio, ratio

    @torch.no_grad()
    def _score(
        self,
        items: list[tuple[list[tuple[list[int], int]], torch.Generator]],
        greedy: bool,
        desc: str,
        disable_tqdm: bool,
    ) -> tuple[list[torch.Tensor], list[bool]]:
        """Per item (its windows and generator): the ``mc_num`` per-draw ELBO estimates (nats, summed over the
        windows) and whether greedy unmasking of each fully masked window gives it back."""
        masks, weights, ratios, targets, owner = [], [], [], [], []
        for item_index, (windows, generator) in enumerate(items):
            for ids, start in windows:
                n = len(ids) - start
                m, w, r = self._draw_masks(n, generator)
                masks.append(m)
                weights.append(w)
                ratios.append(r)
                targets.append((torch.tensor(ids, dtype=torch.long), start))
                owner.append(item_index)
        # rows: (window, draw) with draw -1 = the greedy check (everything masked); long windows first
        order = sorted(range(len(targets)), key=lambda w: -targets[w][0].shape[0])
        rows = [(w, j) for w in order for j in ([-1] if greedy else []) + list(range(self.mc_num))]
        values = [torch.zeros(self.mc_num, dtype=torch.float64) for _ in targets]
        wrong = [0] * len(targets)
        remaining = [0] * len(items)
        for w in range(len(targets)):
            remaining[owner[w]] += self.mc_num + (1 if greedy else 0)
        done_items = sum(1 for left in remaining if left == 0)  # nothing to score (empty continuations)
        bar = tqdm(total=len(items), desc=desc, disable=disable_tqdm, file=sys.stderr, dynamic_ncols=True)
        bar.n = done_items
        for b0 in range(0, len(rows), self.batch_size):
            batch = rows[b0 : b0 + self.batch_size]
            width = max(targets[w][0].shape[0] for w, _ in batch)
            clean = torch.full((len(batch), width), self.mask_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            ratio = torch.ones(len(batch), dtype=torch.float64)
            for r, (w, j) in enumerate(batch):
                ids, start = targets[w]
                end = ids.shape[0]
                clean[r, :end] = ids
                attention[r, :end] = 1
                if j < 0:
                    keep[r, start:end] = True
                else:
                    keep[r, start:end] = masks[w][j]
                    ratio[r] = ratios[w][j]
            if bool(keep.any()):
                x = clean.masked_fill(keep, self.mask_token_id)
                timesteps = None
                if self.time_conditioned:
                    timesteps = self._time_of_ratio(ratio).float().to(self._device)
                logits = self.model(
                    input_ids=x.to(self._device),
                    timesteps=timesteps,
                    attention_mask=None if bool(attention.all()) else attention.to(self._device),
                    logits_to_keep=keep.to(self._device),
                ).logits
                gold = clean[keep].to(self._device)
                nll = torch.empty(gold.shape[0], dtype=torch.float64)
                miss = torch.empty(gold.shape[0], dtype=torch.bool)
                for k0 in range(0, gold.shape[0], _LOGSOFTMAX_ROWS):
                    part = logits[k0 : k0 + _LOGSOFTMAX_ROWS].float()
                    g = gold[k0 : k0 + _LOGSOFTMAX_ROWS]
                    picked = part.gather(1, g[:, None]).squeeze(1)
                    nll[k0 : k0 + part.shape[0]] = (torch.logsumexp(part, -1) - picked).double().cpu()
                    miss[k0 : k0 + part.shape[0]] = (part.argmax(-1) != g).cpu()
                del logits
                row_of = keep.nonzero()[:, 0]
                per_row = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, row_of, nll)
                misses = torch.zeros(len(batch), dtype=torch.long).index_add_(0, row_of, miss.long())
            else:
                per_row = torch.zeros(len(batch), dtype=torch.float64)
                misses = torch.zeros(len(batch), dtype=torch.long)
            for r, (w, j) in enumerate(batch):
                if j < 0:
                    wrong[w] += int(misses[r])
                else:
                    values[w][j] = weights[w][j] * per_row[r]
                remaining[owner[w]] -= 1
                if remaining[owner[w]] == 0:
                    done_items += 1
            bar.n = done_items
            bar.refresh()
        bar.close()
        draws = [torch.zeros(self.mc_num, dtype=torch.float64) for _ in items]
        is_greedy = [True] * len(items)
        for w, item_index in enumerate(owner):
            draws[item_index] += values[w]
            is_greedy[item_index] = is_greedy[item_index] and wrong[w] == 0
        return draws, is_greedy

    def _generator(self, *key: Any) -> torch.Generator:
        return torch.Generator().manual_seed(row_seed(self.seed, _digest(*key), 0, 0))

    def elbo_draws(
        self,
        context_ids: Sequence[int],
        continuation_ids: Sequence[int],
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """``mc_num`` i.i.d. unbiased estimates (float64, nats) of the negative ELBO of ``continuation_ids`` given
        ``context_ids``; their mean is what :meth:`loglikelihood` returns (negated), their std / sqrt(mc_num) its
        standard error.

        With ``x`` the continuation (``n`` tokens) and ``L(S) = sum_{i in S} -log p(x_i | context, x with S masked)``
        (``p`` = the model's ``p_{1|t}`` at the masked positions), the negative ELBO is

            NELBO = sum_{S nonempty} L(S) / (|S| * C(n, |S|))

        and ``-NELBO <= log p(x | context)`` for the model's generative process: a bound, not the exact
        log-likelihood. Both estimators are unbiased for it:

        * ``"count"`` (LLaDA): ``l ~ U{1..n}``, ``S`` = ``l`` positions drawn uniformly, value ``(n / l) L(S)``;
          finite variance. It is the ``"ratio"`` estimator with ``1/t`` replaced by its expectation given the
          number of masked tokens (Rao-Blackwell), minus its draws that mask nothing: lower variance.
        * ``"ratio"`` (MDLM-style continuous time): ``t ~ U(0, 1]``, each token masked with probability ``t``,
          value ``L(S) / t`` (0 when nothing is masked); a time-conditioned model is given the time whose
          ``1 - kappa`` is ``t``. Its variance is infinite (log-divergent, from one masked token at small ``t``):
          its error still shrinks with ``mc_num``, slightly slower than ``1/sqrt(mc_num)``.

        Long inputs are cut by :meth:`windows`; a draw is the sum of the windows' draws. Without ``generator`` the
        draws are seeded by (seed, the two id lists).
        """
        self._check_scoring()
        context_ids, continuation_ids = list(context_ids), list(continuation_ids)
        if not continuation_ids:
            return torch.zeros(self.mc_num, dtype=torch.float64)
        windows = self.windows(context_ids + continuation_ids, len(context_ids))
        generator = generator or self._generator("elbo_draws", context_ids, continuation_ids)
        draws, _ = self._score([(windows, generator)], greedy=False, desc="", disable_tqdm=True)
        return draws[0]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(-NELBO estimate, is_greedy)`` per ``(context, continuation)`` request (see :meth:`elbo_draws`).

        ``is_greedy``: one forward pass with the whole continuation masked; True when the argmax of ``p_{1|t}`` at
        every masked position is the continuation's token (per window for long inputs). Draws are seeded by
        (seed, context, continuation), so a request's estimate does not depend on the others.
        """
        self._check_scoring()
        items, empty = [], []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = self._encode_pair(context, continuation)
            empty.append(not cont)
            generator = self._generator("loglikelihood", context, continuation)
            items.append((self.windows(ctx + cont, len(ctx)) if cont else [], generator))
        draws, greedy = self._score(items, True, "dfm_hf loglikelihood", disable_tqdm or self.rank != 0)
        out = []
        for req, d, g, e in zip(requests, draws, greedy, empty):
            result = (0.0, True) if e else (-float(d.mean()), bool(g))
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """-NELBO estimate of each whole text (``(text,)`` requests), conditioned on the prefix token (BOS, else EOS)
        and cut into :meth:`windows` of ``max_length`` tokens; sum of the windows' estimates."""
        self._check_scoring()
        items = []
        for req in requests:
            text = req.args[0]
            ids = self._prefix() + self.tok_encode(text)
            start = len(self._prefix())
            items.append((self.windows(ids, start), self._generator("loglikelihood_rolling", text)))
        draws, _ = self._score(items, False, "dfm_hf loglikelihood_rolling", disable_tqdm or self.rank != 0)
        out = []
        for req, d in zip(requests, draws):
            value = -float(d.mean())
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
            out.append(value)
        return out

    # ------------------------------------------------------------------ generation
    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """``until``, ``gen_length`` and the sampling overrides of one group of requests."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until gen_kwargs must be a dict, got {type(gen_kwargs).__name__}.")
        unknown = sorted(k for k in gen_kwargs if k not in GEN_KWARGS)
        if unknown:
            self._warn_once(f"gen_kwargs:{unknown}", f"dfm_hf: generate_until ignores gen_kwargs {unknown}.")
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"gen_kwargs `until` must be a string or a list of strings, got {until!r}.")
        cap = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens"))
        gen_length = self.gen_length
        if cap is not None:
            cap = _coerce("max_gen_toks", cap, int)
            if cap < 1:
                raise ValueError(f"gen_kwargs `max_gen_toks` must be >= 1, got {cap}.")
            gen_length = min(gen_length, cap)
        if gen_length >= self.max_length:
            raise ValueError(
                f"`gen_length` ({gen_length}) leaves no room for a prompt in max_length={self.max_length} positions."
            )
        temperature = self.temperature
        if temperature is None:
            if gen_kwargs.get("do_sample") is False:
                temperature = 0.0
            elif gen_kwargs.get("temperature") is not None:
                temperature = _coerce("temperature", gen_kwargs["temperature"], float)
        call: dict[str, Any] = {}
        if temperature is not None:
            call["temperature"] = temperature
        for key, kind in (("top_k", int), ("top_p", float)):
            if gen_kwargs.get(key) is not None:
                call[key] = _coerce(key, gen_kwargs[key], kind)
        if self.guidance_scale != 1.0:
            call["guidance_scale"] = self.guidance_scale
        return {"until": [s for s in until if s], "gen_length": gen_length, "call": call}

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate ``gen_length`` tokens (capped by the task's ``max_gen_toks``) after each context with the
        pipeline; the text is cut at the first EOS and at the first of the task's ``until`` strings.

        Requests with the same ``gen_kwargs`` are batched ``batch_size`` rows at a time; a context too long for
        ``max_length - gen_length`` positions keeps its end. Request ``i`` samples from a generator seeded by
        ``(seed, i)``: its text does not depend on the batch size.
        """
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(
            total=len(requests),
            desc="dfm_hf generate_until",
            disable=disable_tqdm or self.rank != 0,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for indices in groups.values():
            settings = self._generation_settings(requests[indices[0]].args[1])
            gen_length = settings["gen_length"]
            room = self.max_length - gen_length
            # similar prompt lengths together (less padding); the order does not change any text
            indices = sorted(indices, key=lambda i: len(requests[i].args[0]))
            for b0 in range(0, len(indices), self.batch_size):
                chunk = indices[b0 : b0 + self.batch_size]
                rows = []
                for i in chunk:
                    ids = self._context_ids(requests[i].args[0])
                    rows.append(ids[len(ids) - room :] if len(ids) > room else ids)
                generators = [torch.Generator().manual_seed(row_seed(self.seed, "generate_until", i, 0)) for i in chunk]
                out = self.pipe(
                    input_ids=rows,
                    gen_length=gen_length,
                    num_inference_steps=self.num_inference_steps,
                    generator=generators,
                    output_type="pt",
                    return_full_text=False,
                    **settings["call"],
                )
                for r, i in enumerate(chunk):
                    text = decode_generated(self.tokenizer, out.sequences[r, :gen_length].tolist(), "completion")
                    text = truncate_completion(text, tuple(settings["until"]))
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]

    def _context_ids(self, context: str) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return ([int(bos)] if bos is not None else []) + (self.tok_encode(context) if context else [])


def _coerce_all(values: dict[str, Any]) -> dict[str, Any]:
    """The constructor's arguments converted to their annotated types (``pretrained`` and extras untouched)."""
    hints = typing.get_type_hints(DFMLM.__init__)
    out = {}
    for name, value in values.items():
        if name in ("self", "unknown", "pretrained", "__class__") or name not in hints:
            continue
        out[name] = _coerce(name, value, hints[name])
    return out


# ---------------------------------------------------------------------------------------------- command line
_USAGE = f"""usage: dfm-hf lm-eval [--model_args pretrained=PATH_OR_HUB_ID,mc_num=N,...] --tasks TASK [...]
                      [lm-eval options]

Runs lm-eval's `run` with --model dfm_hf and --include_path {TASKS_PATH}
(shipped offline tasks: {", ".join(TASK_NAMES)}; tag {TAG}). Every other option goes to lm-eval unchanged
(--limit, --num_fewshot, --output_path, --log_samples, --confirm_run_unsafe_code, --apply_chat_template, ...).
Without pretrained=, the bundled model is used; without --batch_size, 32 rows per forward pass (lm-eval's own
default is 1); without --device, CUDA when available, else the CPU. DFMLM model arguments: mc_num, batch_size,
num_inference_steps, gen_length, block_length, guidance_scale, scheduler_preset, temperature, device, dtype, seed,
estimator, max_length, revision.
"""


def _has_option(argv: Sequence[str], *names: str) -> bool:
    return any(a in names or any(a.startswith(n + "=") for n in names) for a in argv)


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """``dfm-hf lm-eval``: lm-eval's own command line with ``--model dfm_hf`` and the shipped tasks.

    Raises ``ValueError`` (the dfm-hf CLI turns it into exit code 2) for ``--model`` (set here) and
    ``--include_path`` (set here: pass your own task YAML files as ``--tasks`` paths instead).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if _has_option(argv, "-h", "--help"):
        print(_USAGE, file=sys.stderr)
        argv = ["--help"]
    if _has_option(argv, "--model", "-M"):
        raise ValueError(
            "`--model` is set by dfm-hf lm-eval (dfm_hf); pass the pipeline as --model_args pretrained=..."
        )
    if _has_option(argv, "--include_path"):
        raise ValueError(
            f"`--include_path` is set by dfm-hf lm-eval to the shipped tasks ({TASKS_PATH}); pass your own task "
            "YAML files as --tasks paths (lm-eval accepts them) or run lm-eval itself after importing "
            "dfm_hf.evaluation.harness."
        )
    if argv != ["--help"]:
        # repeated --model_args merge in lm-eval's parser: ours first, the caller's win
        if not any("pretrained" in a for a in argv):
            from ..bundled_model import require_bundled_model

            argv = ["--model_args", f"pretrained={require_bundled_model()}"] + argv
        if not _has_option(argv, "--batch_size", "-b"):
            argv = ["--batch_size", "32"] + argv
        if not _has_option(argv, "--device"):  # lm-eval's default is "cuda" even where there is none
            argv = ["--device", "cuda" if torch.cuda.is_available() else "cpu"] + argv
    from lm_eval._cli import HarnessCLI

    saved = sys.argv
    sys.argv = ["lm-eval", "run", "--model", "dfm_hf", "--include_path", TASKS_PATH, *argv]
    try:
        parser = HarnessCLI()
        parser.execute(parser.parse_args())
    finally:
        sys.argv = saved
    return 0
