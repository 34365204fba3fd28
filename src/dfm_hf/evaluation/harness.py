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

The ELBO estimators live in :mod:`.elbo`, the argument handling in :mod:`.harness_args`, ``dfm-hf lm-eval`` in
:mod:`.harness_cli`. The shipped offline tasks (``humaneval_local``, ``stdlib_next_line``) live in :data:`TASKS_PATH`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
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
from . import elbo
from .elbo import ESTIMATORS
from .harness_args import coerce_arguments, generation_settings, load_pipeline, select_scheduler
from .lm_eval_tasks import TASKS_PATH
from .tasks import decode_generated, row_seed, truncate_completion

__all__ = ["DTYPES", "DFMLM", "ESTIMATORS", "TASKS_PATH", "task_manager"]

logger = logging.getLogger(__name__)

#: ``dtype=`` values (None and "auto" keep the checkpoint's dtype).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def task_manager(include_defaults: bool = True, **kwargs: Any) -> Any:
    """An ``lm_eval.tasks.TaskManager`` that also knows the shipped tasks (``include_path=TASKS_PATH``).

    ``include_defaults=False`` skips indexing lm-eval's own ~15k task files (about 10 s).
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=TASKS_PATH, include_defaults=include_defaults, **kwargs)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode()).hexdigest()[:32]


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
        args = coerce_arguments(DFMLM.__init__, dict(locals()), skip=("self", "unknown", "pretrained", "__class__"))
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

        pipe = load_pipeline(pretrained, args["revision"], torch_dtype)
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
        scheduler_preset = args["scheduler_preset"]
        scheduler = select_scheduler(pipe, scheduler_preset, args["block_length"])
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
        """The scoring of ``ids[start:]`` cut into windows of at most ``max_length`` tokens (see
        :func:`dfm_hf.evaluation.elbo.windows`)."""
        return elbo.windows(ids, start, self.max_length)

    def _score(
        self, items: list[tuple[list[tuple[list[int], int]], torch.Generator]], greedy: bool, desc: str, disable: bool
    ) -> tuple[list[torch.Tensor], list[bool]]:
        """:func:`dfm_hf.evaluation.elbo.score_windows` with this model's settings."""
        return elbo.score_windows(
            self.model,
            items,
            mc_num=self.mc_num,
            estimator=self.estimator,
            batch_size=self.batch_size,
            mask_token_id=self.mask_token_id,
            kappa=self._kappa if self.time_conditioned else None,
            greedy=greedy,
            desc=desc,
            disable_tqdm=disable,
        )

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

        The NELBO and the two estimators (``"count"``, ``"ratio"``) are defined in :mod:`dfm_hf.evaluation.elbo`;
        ``-NELBO`` is a lower bound on ``log p(continuation | context)``, not the exact log-likelihood. Long inputs
        are cut by :meth:`windows`; a draw is the sum of the windows' draws. Without ``generator`` the draws are
        seeded by (seed, the two id lists).
        """
        self._check_scoring()
        context_ids, continuation_ids = list(context_ids), list(continuation_ids)
        if not continuation_ids:
            return torch.zeros(self.mc_num, dtype=torch.float64)
        windows = self.windows(context_ids + continuation_ids, len(context_ids))
        generator = generator or self._generator("elbo_draws", context_ids, continuation_ids)
        draws, _ = self._score([(windows, generator)], False, "", True)
        return draws[0]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(-NELBO estimate, is_greedy)`` per ``(context, continuation)`` request (see :meth:`elbo_draws`).

        ``is_greedy``: one forward pass with the whole continuation masked; True when the argmax of ``p_{1|t}`` at
        every masked position (over every token but the mask token, as the samplers draw) is the continuation's
        token (per window for long inputs). Draws are seeded by (seed, context, continuation), so a request's
        estimate does not depend on the others.
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
            settings = generation_settings(
                requests[indices[0]].args[1],
                gen_length=self.gen_length,
                max_length=self.max_length,
                temperature=self.temperature,
                guidance_scale=self.guidance_scale,
                warn=self._warn_once,
            )
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
