"""Shared helpers of the benchmark scripts: argument parsing, alternating timing, peak-memory probes, result lines.

Every script prints ``# ...`` comment lines (machine, settings) and one result line per comparison::

    what | ours | theirs | ratio | target | PASS/FAIL

``INFO`` replaces the verdict on lines that carry no target. Timings are medians of several rounds in which ours and
theirs run alternately in the same process on the same inputs; the ratio is the median of the per-round ratios (robust
to a busy machine drifting between rounds).

Memory (CPU): each measurement runs in a fresh ``python`` subprocess with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB
(glibc then serves every larger block with ``mmap`` and returns it on ``free``, so freed buffers do not hide inside the
heap). The child builds its inputs, runs the measured call once as a warm-up, resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), runs the call again and reports ``VmHWM - VmRSS_before``: the physical memory the
call touched at its peak, over what was resident before. On CUDA the probe uses ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

LINE_FIELDS = 6
VERDICTS = ("PASS", "FAIL", "INFO")
MIB = 1024 * 1024
#: ``--device`` values.
DEVICES = ("cpu", "cuda", "mps", "xpu")


# ---------------------------------------------------------------------------------------------------------------------
# arguments, machine, output
# ---------------------------------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every script takes: ``--device``, ``--quick``, ``--repeats``, ``--seed``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where the models run (see setup)")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test); overrides the size flags")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (median); default per script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)"
    )
    return parser


def device_available(device: str) -> bool:
    """Whether torch can run on ``device`` (one of :data:`DEVICES`) on this machine."""
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return torch.backends.mps.is_available()
    if device == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return device == "cpu"


def setup(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (before any parallel work, and for the probe subprocesses through OMP_NUM_THREADS); exit
    with a clear message when ``--device`` is not available here."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if not device_available(args.device):
        raise SystemExit(
            f"--device {args.device}: torch {torch.__version__} sees no {args.device} device on this machine "
            f"(available: {', '.join(d for d in DEVICES if device_available(d))})"
        )


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_header(name: str, device: str, settings: dict[str, Any]) -> None:
    """Print ``#`` lines naming the benchmark, the machine and the settings."""
    dev = device
    if device in ("cuda", "xpu") and device_available(device):
        dev = f"{device} ({getattr(torch, device).get_device_name()})"
    print(f"# {name}")
    print(
        f"# machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}, device {dev}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("# settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    sys.stdout.flush()


@dataclass
class Result:
    """One comparison line."""

    what: str
    ours: str
    theirs: str
    ratio: Optional[float]
    target: str
    verdict: str

    def line(self) -> str:
        ratio = "-" if self.ratio is None else f"{self.ratio:.4g}"
        return " | ".join([self.what, self.ours, self.theirs, ratio, self.target, self.verdict])


def verdict(ratio: float, op: str, bound: float) -> str:
    """``PASS`` when ``ratio op bound`` holds (``op`` is ``"<="``, ``">="`` or ``"=="``), else ``FAIL``."""
    ok = {"<=": ratio <= bound, ">=": ratio >= bound, "==": ratio == bound}[op]
    return "PASS" if ok else "FAIL"


def emit(
    what: str,
    ours: str,
    theirs: str,
    ratio: Optional[float],
    op: Optional[str] = None,
    bound: Optional[float] = None,
) -> Result:
    """Print (and return) a result line; ``op=None`` makes it an ``INFO`` line without a target."""
    if op is None or ratio is None:
        res = Result(what, ours, theirs, ratio, "-", "INFO")
    else:
        res = Result(what, ours, theirs, ratio, f"{op} {bound:g}", verdict(ratio, op, bound))
    print(res.line())
    sys.stdout.flush()
    return res


def parse_line(line: str) -> Optional[Result]:
    """Parse a result line (``None`` for comment or blank lines); raises ``ValueError`` on a malformed line."""
    if not line.strip() or line.startswith("#"):
        return None
    parts = [p.strip() for p in line.split(" | ")]
    if len(parts) != LINE_FIELDS or not all(parts):
        raise ValueError(f"expected {LINE_FIELDS} non-empty ' | '-separated fields, got {line!r}")
    what, ours, theirs, ratio, target, verdict_ = parts
    if verdict_ not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict_!r} in {line!r}")
    value = None if ratio == "-" else float(ratio)
    if verdict_ != "INFO" and not re.fullmatch(r"(<=|>=|==) \S+", target):
        raise ValueError(f"target must look like '<= 0.02', got {target!r} in {line!r}")
    return Result(what, ours, theirs, value, target, verdict_)


def fmt_s(seconds: float) -> str:
    """Seconds as ``'12.3 ms'`` or ``'4.56 s'``."""
    return f"{seconds * 1e3:.3g} ms" if seconds < 1.0 else f"{seconds:.3g} s"


def fmt_mib(nbytes: float) -> str:
    """Bytes as ``'123.4 MiB'``."""
    return f"{nbytes / MIB:.1f} MiB"


# ---------------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------------


def random_pipeline(
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int,
    device: str,
    seed: int = 0,
    block_size: Optional[int] = None,
    **scheduler_kwargs: Any,
) -> Any:
    """A ``DFMPipeline`` around a randomly initialised ``DFMForMaskedGeneration`` (mask id ``vocab - 1``, pad 0,
    no time conditioning; ``block_size``: a block-diffusion model) and a ``DiscreteFlowScheduler`` (linear kappa
    unless ``scheduler_kwargs`` say otherwise)."""
    from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
    from dfm_hf.pipelines import DFMPipeline
    from dfm_hf.schedulers import DiscreteFlowScheduler

    torch.manual_seed(seed)
    config = DFMConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        mask_token_id=vocab - 1,
        pad_token_id=0,
        time_conditioning=False,
        block_size=block_size,
    )
    model = DFMForMaskedGeneration(config).eval().to(device)
    scheduler = DiscreteFlowScheduler(mask_token_id=vocab - 1, vocab_size=vocab, **scheduler_kwargs)
    pipe = DFMPipeline(model=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(device: str, seed: int) -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device``."""
    return torch.Generator(device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device in ("cuda", "mps", "xpu"):
        getattr(torch, device).synchronize()


def time_call(fn: Callable[[], Any], device: str) -> float:
    """Wall seconds of one call of ``fn`` (device-synchronised)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    """Medians of alternating rounds: ``times[name]`` in seconds, and the median per-round ratio ``ours/theirs``."""

    times: dict[str, float]
    ratios: dict[str, float]
    rounds: int


def time_alternating(
    fns: dict[str, Callable[[], Any]], device: str, rounds: int, warmup: int = 1, reference: str = "ours"
) -> Timing:
    """Run each function once per round, alternating (and alternating the order between rounds).

    Returns the median time of each and, for every other function, the median of the per-round ratios
    ``reference / other``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(time_call(fns[name], device))
    times = {n: statistics.median(v) for n, v in samples.items()}
    ratios = {
        n: statistics.median(a / b for a, b in zip(samples[reference], samples[n])) for n in names if n != reference
    }
    return Timing(times, ratios, rounds)


# ---------------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], Any], device: str) -> dict[str, int]:
    """Peak memory ``fn`` adds over what is resident when it starts (see the module docstring).

    Returns ``{"before": ..., "peak": ..., "extra": ...}`` in bytes. CPU: RSS from /proc/self/status after resetting
    the peak counter with ``/proc/self/clear_refs``. CUDA, XPU: allocated device memory (``max_memory_allocated``).
    MPS has no peak counter: ``SystemExit``.
    """
    if device == "mps":
        raise SystemExit("--device mps: torch.mps has no peak-memory counter; measure memory on cpu, cuda or xpu")
    if device in ("cuda", "xpu"):
        backend = getattr(torch, device)
        backend.synchronize()
        backend.reset_peak_memory_stats()
        before = backend.memory_allocated()
        fn()
        backend.synchronize()
        peak = backend.max_memory_allocated()
        return {"before": before, "peak": peak, "extra": peak - before}
    before = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    fn()
    peak = _status_kib("VmHWM") * 1024
    return {"before": before, "peak": peak, "extra": peak - before}


def run_probe(script: str, probe: str, args: Sequence[str], timeout: float = 1800.0) -> dict[str, Any]:
    """Run ``python <script> --probe <probe> <args>`` in a fresh process and return the JSON it prints last.

    The child runs with a fixed glibc mmap threshold (see the module docstring) and the same torch thread count.
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    cmd = [sys.executable, os.path.abspath(script), "--probe", probe, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {probe!r} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"probe {probe!r} printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def report_probe(result: dict[str, Any]) -> None:
    """Print a probe's result as the JSON line :func:`run_probe` reads."""
    print(json.dumps(result))
    sys.stdout.flush()
