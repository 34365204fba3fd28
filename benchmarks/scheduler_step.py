"""Scheduler step alone: ``DiscreteFlowScheduler.step`` vs Meta's ``MixtureDiscreteEulerSolver`` and diffusers'
``BlockRefinementScheduler.step`` on the same (batch, length, vocab) float32 logits.

State: mask source, about half the positions masked (the others hold random tokens, and the logits there peak on
that token as a trained denoiser's would), time ``t_32 = 0.5`` of a 64-step uniform grid.

* ours: ``scheduler.step(logits, t, sample, generator=g)`` (the call users make: it plans and steps); extra line:
  ``plan_step`` + ``step`` on the packed rows (what the pipeline does with ``logits_to_keep``).
* flow_matching: one step of ``MixtureDiscreteEulerSolver.sample`` on a ``MixtureDiscreteProbPath`` with
  ``PolynomialConvexScheduler(n=1)``, step size ``h = 1/64`` from ``t = 0.5``. ``sample`` feeds the model output
  straight to ``torch.multinomial``: it expects probabilities, so the wrapper returns ``softmax(logits)`` computed
  once before timing (the softmax is not charged to it). The solver is run on the grid ``[t, t+h, t+2h]`` and stopped
  when it calls the model the second time: exactly one non-final Euler step is timed.
* diffusers: ``BlockRefinementScheduler.step(logits, 32, sample, mask_token_id=...)`` with its defaults (greedy,
  ``threshold`` from the config), the 1024 positions being one block of a 64-step schedule.

Memory: see ``benchmarks/common.py`` (fresh subprocess per measurement, peak RSS over the resident set before).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    base_parser,
    emit,
    fmt_mib,
    fmt_s,
    peak_extra_bytes,
    print_header,
    report_probe,
    run_probe,
    setup,
    time_alternating,
)

from dfm_hf.schedulers import DiscreteFlowScheduler  # noqa: E402

GRID = 64
STEP = 32


class _StopSolver(Exception):
    """Raised by the wrapped model on its second call: the first solver step is done."""


def make_inputs(batch: int, length: int, vocab: int, seed: int, device: str) -> dict[str, Any]:
    """Logits (float32, built in place), a half-masked sample and the mask id (``vocab - 1``)."""
    g = torch.Generator().manual_seed(seed)
    mask_id = vocab - 1
    logits = torch.empty(batch, length, vocab).normal_(generator=g)
    tokens = torch.randint(0, vocab - 1, (batch, length), generator=g)
    masked = torch.rand(batch, length, generator=g) < 0.5
    sample = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    rows, cols = (~masked).nonzero(as_tuple=True)
    logits[rows, cols, sample[rows, cols]] += 20.0  # a denoiser is sure of the visible tokens
    return {"logits": logits.to(device), "sample": sample.to(device), "mask_id": mask_id}


def ours_step(inputs: dict[str, Any], device: str, seed: int) -> Callable[[], Any]:
    """The plain call: ``step(full_logits, t, sample)``."""
    vocab = inputs["logits"].shape[-1]
    sched = DiscreteFlowScheduler(mask_token_id=inputs["mask_id"], vocab_size=vocab)
    sched.set_timesteps(GRID, device=device)
    t = sched.timesteps[STEP]
    gen = torch.Generator(device).manual_seed(seed)
    logits, sample = inputs["logits"], inputs["sample"]
    return lambda: sched.step(logits, t, sample, generator=gen).prev_sample


def ours_plan_packed(inputs: dict[str, Any], device: str, seed: int) -> Callable[[], Any]:
    """``plan_step`` then ``step`` on the packed rows (the rows are gathered once, outside the timed call)."""
    vocab = inputs["logits"].shape[-1]
    sched = DiscreteFlowScheduler(mask_token_id=inputs["mask_id"], vocab_size=vocab)
    sched.set_timesteps(GRID, device=device)
    t = sched.timesteps[STEP]
    gen = torch.Generator(device)
    sample = inputs["sample"]
    gen.manual_seed(seed)
    packed = inputs["logits"][sched.plan_step(sample, t, gen).positions]

    def run() -> torch.Tensor:
        gen.manual_seed(seed)  # same plan every call, so the packed rows match it
        plan = sched.plan_step(sample, t, gen)
        return sched.step(packed, t, sample, generator=gen, plan=plan).prev_sample

    return run


def theirs_flow_matching(inputs: dict[str, Any], device: str, seed: int) -> Callable[[], Any]:
    """One ``MixtureDiscreteEulerSolver`` step from t = 0.5 with h = 1/64 (model output: precomputed probabilities)."""
    try:
        import flow_matching  # noqa: F401
    except ImportError as err:
        raise SystemExit("this comparison needs flow_matching: pip install -e '.[bench]' (or '.[dev]')") from err
    from flow_matching.path import MixtureDiscreteProbPath
    from flow_matching.path.scheduler import PolynomialConvexScheduler
    from flow_matching.solver import MixtureDiscreteEulerSolver
    from flow_matching.utils import ModelWrapper

    probs = torch.softmax(inputs["logits"], dim=-1)

    class Precomputed(ModelWrapper):
        def __init__(self) -> None:
            super().__init__(None)
            self.calls = 0

        def forward(self, x: torch.Tensor, t: torch.Tensor, **extras: Any) -> torch.Tensor:
            self.calls += 1
            if self.calls > 1:
                raise _StopSolver
            return probs

    model = Precomputed()
    vocab = probs.shape[-1]
    solver = MixtureDiscreteEulerSolver(model, MixtureDiscreteProbPath(PolynomialConvexScheduler(n=1)), vocab)
    t0, h = STEP / GRID, 1.0 / GRID
    grid = torch.tensor([t0, t0 + h, t0 + 2 * h], device=device)
    sample = inputs["sample"]
    torch.manual_seed(seed)

    def run() -> None:
        model.calls = 0
        try:
            solver.sample(x_init=sample, step_size=None, time_grid=grid)
        except _StopSolver:
            pass

    return run


def theirs_block_refinement(inputs: dict[str, Any], device: str, seed: int, **step_kwargs: Any) -> Callable[[], Any]:
    """diffusers' ``BlockRefinementScheduler.step`` with its defaults (the whole row is one block)."""
    from diffusers import BlockRefinementScheduler

    logits, sample = inputs["logits"], inputs["sample"]
    sched = BlockRefinementScheduler(block_length=sample.shape[1], num_inference_steps=GRID)
    sched.set_timesteps(GRID, device=device, block_length=sample.shape[1])
    gen = torch.Generator(device).manual_seed(seed)
    mask_id = inputs["mask_id"]
    return lambda: sched.step(logits, STEP, sample, mask_token_id=mask_id, generator=gen, **step_kwargs).prev_sample


BUILDERS: dict[str, Callable[..., Callable[[], Any]]] = {
    "ours": ours_step,
    "ours_packed": ours_plan_packed,
    "flow_matching": theirs_flow_matching,
    "block_refinement": theirs_block_refinement,
}


def probe(args: argparse.Namespace) -> None:
    """Child process: peak extra memory of one call of ``args.probe`` (after one warm-up call)."""
    inputs = make_inputs(args.batch, args.length, args.vocab, args.seed, args.device)
    fn = BUILDERS[args.probe](inputs, args.device, args.seed)
    fn()
    report_probe(peak_extra_bytes(fn, args.device))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    parser.add_argument("--probe", choices=sorted(BUILDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args)
    if args.quick:
        args.batch, args.length, args.vocab = 2, 128, 2048
    if args.probe:
        probe(args)
        return
    rounds = args.repeats or (3 if args.quick else 5)
    shape = f"({args.batch}, {args.length}, {args.vocab})"
    print_header(
        "scheduler step alone, mask source, float32 logits",
        args.device,
        {"logits": shape, "grid": f"{GRID} steps", "t": f"{STEP}/{GRID}", "rounds": rounds},
    )
    inputs = make_inputs(args.batch, args.length, args.vocab, args.seed, args.device)
    masked = int((inputs["sample"] == inputs["mask_id"]).sum())
    print(f"# masked positions: {masked} of {inputs['sample'].numel()}")

    fns = {name: build(inputs, args.device, args.seed) for name, build in BUILDERS.items()}
    fns["block_refinement_t1"] = theirs_block_refinement(
        inputs, args.device, args.seed, temperature=1.0, sampling_method="multinomial"
    )
    timing = time_alternating(fns, args.device, rounds)
    tt, rr = timing.times, timing.ratios
    # ratio = ours / theirs per round; "ours_packed" is also reported against flow_matching
    emit(
        f"step time vs flow_matching MixtureDiscreteEulerSolver step {shape}",
        fmt_s(tt["ours"]),
        fmt_s(tt["flow_matching"]),
        rr["flow_matching"],
        "<=",
        0.02,
    )
    emit(
        f"step time vs diffusers BlockRefinementScheduler.step (defaults: greedy) {shape}",
        fmt_s(tt["ours"]),
        fmt_s(tt["block_refinement"]),
        rr["block_refinement"],
        "<=",
        1.0,
    )
    emit(
        f"step time vs BlockRefinementScheduler.step temperature=1 multinomial {shape}",
        fmt_s(tt["ours"]),
        fmt_s(tt["block_refinement_t1"]),
        rr["block_refinement_t1"],
        None,
        None,
    )
    emit(
        f"plan_step + step(packed rows) vs flow_matching step {shape}",
        fmt_s(tt["ours_packed"]),
        fmt_s(tt["flow_matching"]),
        tt["ours_packed"] / tt["flow_matching"],
        "<=",
        0.02,
    )
    del fns, inputs

    if args.no_memory:
        return
    budget = args.batch * args.length * args.vocab * 4
    size_args = ["--batch", str(args.batch), "--length", str(args.length), "--vocab", str(args.vocab)]
    size_args += ["--device", args.device, "--seed", str(args.seed)]
    mem = {"ours": run_probe(__file__, "ours", size_args)["extra"]}
    emit(
        "peak extra memory of step vs one float32 logits tensor",
        fmt_mib(mem["ours"]),
        fmt_mib(budget),
        mem["ours"] / budget,
        "<=",
        1.0,
    )
    if args.quick:  # the smoke test: one subprocess is enough
        return
    for name in ("ours_packed", "flow_matching", "block_refinement"):
        mem[name] = run_probe(__file__, name, size_args)["extra"]
    emit(
        "peak extra memory of plan_step + step(packed) vs one float32 logits tensor",
        fmt_mib(mem["ours_packed"]),
        fmt_mib(budget),
        mem["ours_packed"] / budget,
    )
    for name in ("flow_matching", "block_refinement"):
        emit(
            f"peak extra memory of step vs {name} step",
            fmt_mib(mem["ours"]),
            fmt_mib(mem[name]),
            mem["ours"] / mem[name],
        )


if __name__ == "__main__":
    main()
