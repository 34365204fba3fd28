"""Train a Discrete Flow Matching model (same flags as `dfm-hf train`; see `--help`).

One process:  python examples/train_dfm.py --stdlib --output_dir runs/dfm --max_train_steps 2000
Two CPU processes (a real gloo group):  torchrun --nproc_per_node 2 examples/train_dfm.py --stdlib ...
"""

from dfm_hf.training.train import main

if __name__ == "__main__":
    main()
