"""Evaluate a DFM pipeline: sweep tasks x scheduler presets x NFE (same flags as ``dfm-hf evaluate``; see --help).

One process:  python examples/evaluate.py --model runs/dfm --tasks genppl stdlib_infill --nfe 16 32 64 \\
                  --output_dir runs/eval
Two CPU processes (a real gloo group):  torchrun --nproc_per_node 2 examples/evaluate.py --model runs/dfm ...
(on a CPU-only machine `accelerate launch --num_processes 2` starts only one process: use torchrun.)
"""

import os
import sys

# Python puts this file's folder first on sys.path, where this very file would shadow the `evaluate` library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from dfm_hf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))  # `dfm-hf evaluate`: without --model, the bundled model
