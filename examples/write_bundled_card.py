"""Write the bundled model's card from its training log.

Usage: python examples/write_bundled_card.py docs/bundled_card_evaluation.md
"""

import json
import os
import sys

from dfm_hf.hub import render_pipeline_card

folder = "src/dfm_hf/bundled/dfm-code-stdlib"
records = [json.loads(line) for line in open(f"{folder}/logs/training_metrics.jsonl")]
final = [r for r in records if "val_loss" in r][-1]
train = [r for r in records if "loss" in r and "val_loss" not in r]
evaluation_extra = open(sys.argv[1]).read() if len(sys.argv) > 1 else "Infilling exact match: not measured yet."
command = open("examples/train_bundled_model.sh").read().split("set -euo pipefail\n", 1)[1].strip()
tokens_m = final["step"] * 16 * 128 / 1e6
# elapsed_s restarts at each (resumed) invocation: add up the last value of each segment
segments = [a["elapsed_s"] for a, b in zip(train, train[1:]) if b["elapsed_s"] < a["elapsed_s"]] + [
    train[-1]["elapsed_s"]
]
minutes = sum(segments) / 60
training = f"""Trained by our own script, reproducible on a 2-core CPU with:

```bash
MAX_STEPS={final["step"]} MAX_MINUTES=100000 bash examples/train_bundled_model.sh runs/dfm-code-stdlib
```

which runs:

```bash
{command}
```

- **Data**: the Python 3.11 standard library sources of the training interpreter (`*.py` outside `test/`, `tests/`,
  `idle_test/`; files that are not valid UTF-8 skipped), split by file: 5% of the files (by a hash of their path)
  are held out for validation and never trained on.
- **Tokenizer**: a byte-level BPE with 4096 tokens (`<|pad|>` 0, `<|endoftext|>` 1, `<|mask|>` 2) trained on the
  training files by the same script.
- **Model**: `DFMForMaskedGeneration`, hidden 256, 4 layers, 4 heads, MLP 704, rotary, tied head,
  4.3M parameters (tied head counted once),
  `time_conditioning=False` (the mask-source posterior does not depend on t, so exact step skipping applies).
- **Path and loss**: mask source, linear kappa, cross-entropy on the masked positions; couplings: 20% unconditional,
  40% prefix (a random-length prompt kept clean), 40% infilling (1-3 masked spans inside clean context).
- **Optimisation**: AdamW (0.9, 0.95), lr 2e-3 constant after 100 warmup steps (so a run cut by wall time equals a
  run of that many steps), batch 16 x 128 tokens, seed 0.
- **Steps and time**: {final["step"]} steps (~{tokens_m:.1f}M tokens), {minutes:.0f} minutes of training on a 2-core
  CPU in {len(segments)} invocations (the first capped by `--max_train_minutes 80` on a box shared with other jobs, the
  next resumed with `--resume_from_checkpoint latest` on a quiet one; resuming is exact, so this equals one run of
  that many steps).
"""
evaluation = f"""Measured on the held-out standard-library files at step {final["step"]}:

| metric | value |
|---|---|
| validation cross-entropy on masked tokens (nats, t ~ U[0, 1)) | {final["val_loss"]:.3f} |
| ELBO bound on -log p(x) per token (nats) | {final["elbo_per_token"]:.3f} |
| perplexity bound exp(ELBO / tokens) | {final["ppl_bound"]:.0f} |

{evaluation_extra}

Samples logged at the end of training (unconditional, 64 tokens, 64 steps, linear kappa):

""" + "\n\n".join("```\n" + s + "\n```" for s in final["samples"])
limitations = f"""This is a 4.3M-parameter model trained for {minutes:.0f} CPU-minutes on ~{tokens_m:.0f}M tokens: it
has learned the surface statistics of Python (indentation, keywords, identifiers, common names) but not reliable
syntax or semantics. Completions and infills are code-flavoured text, rarely valid Python, and not correct programs;
its perplexity bound (above) is far from a useful code model's. It exists so that `dfm-hf generate` does something
real offline and so the whole pipeline (training, sampling, presets, caching, infilling) is exercised end to end.
Train a larger model with `examples/train_dfm.py` (e.g. `--model_config base` on a GPU) for useful output."""
card = render_pipeline_card(
    "dfm-code-stdlib",
    metrics={k: final[k] for k in ("val_loss", "elbo_per_token", "ppl_bound")},
    datasets=None,
    license="apache-2.0",  # the weights; the training data is the PSF-licensed Python standard library
    limitations=limitations,
    training_section=training.rstrip("\n"),
    evaluation_section=evaluation,
    load_expression="dfm_hf.bundles.bundled_model_path()",  # the usage snippet loads the copy inside the package
    load_import="import dfm_hf.bundles",
)
card.save(f"{folder}/README.md.tmp")  # then renamed: an interrupted run leaves the old card whole
os.replace(f"{folder}/README.md.tmp", f"{folder}/README.md")
print(str(card)[:3000])
