#!/usr/bin/env bash
# The DFM paper's evaluations at our scale (results go to docs/paper_tables.md; every command is echoed and logged).
#
#   bash examples/paper_tables.sh                      # everything, 2 CPU processes (torchrun, gloo)
#   PARTS="genppl infill" bash examples/paper_tables.sh  # a subset: genppl infill humaneval ar
#
# Inputs: the bundled model (MODEL), the AR baseline of examples/train_ar_baseline.py (AR_DIR, snapshots step-<k>/)
# and copies of the bundled run's checkpoint weights (CKPT_DIR/step-<k>.safetensors) for the same-steps comparison.
# Every sweep is resumable: rerunning the script recomputes only the missing cells.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-src/dfm_hf/bundled/dfm-code-stdlib}
OUT=${OUT:-runs/paper}
AR_DIR=${AR_DIR:-runs/ar-baseline}
CKPT_DIR=${CKPT_DIR:-runs/dfm-ckpt-copies}
NPROC=${NPROC:-2}
PARTS=${PARTS:-"valppl genppl infill ar humaneval render"}
DFM_LOG=${DFM_LOG:-runs/dfm-code-stdlib/logs/metrics.jsonl}
PRESETS=${PRESETS:-"linear-euler cubic-euler cubic-corrector confidence"}
GENPPL_NFE=${GENPPL_NFE:-"16 32 64 128"}
GENPPL_SAMPLES=${GENPPL_SAMPLES:-32}
INFILL_NFE=${INFILL_NFE:-"4 8 16 32"}
INFILL_EXAMPLES=${INFILL_EXAMPLES:-200}
HE_PRESETS=${HE_PRESETS:-"linear-euler cubic-euler"}
HE_NFE=${HE_NFE:-"16 64"}
HE_EXAMPLES=${HE_EXAMPLES:-40}
HE_SAMPLES=${HE_SAMPLES:-10}
SEED=${SEED:-0}
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false

mkdir -p "$OUT"
if [ "$NPROC" -gt 1 ]; then
  LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC" examples/evaluate.py)
else
  LAUNCH=(python examples/evaluate.py)
fi
run() {  # echo, log and run one command
  echo "+ $*" | tee -a "$OUT/commands.txt" >&2
  "$@"
}
COMMON=(--seed "$SEED" --num_threads 1)

has() { [[ " $PARTS " == *" $1 "* ]]; }

# 0. held-out perplexity: AR exact perplexity vs the DFM ELBO bound (exp of the GKL integral per token), both on the
#    first 256 held-out blocks, at the steps where both training logs evaluated
if has valppl; then
  run python - "$DFM_LOG" "$AR_DIR/metrics.jsonl" <<'EOF' | tee "$OUT/valppl.md"
import json, sys
def read(path, key):
    out = {}
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        if key in r:
            out[r["step"]] = r
    return out
dfm, ar = read(sys.argv[1], "ppl_bound"), read(sys.argv[2], "val_ppl")
print("| step | DFM ELBO ppl bound (<=) | DFM masked-token CE | AR val ppl | AR val NLL |")
print("|---|---|---|---|---|")
for step in sorted(set(dfm) | set(ar)):
    d, a = dfm.get(step, {}), ar.get(step, {})
    cells = [f"{d['ppl_bound']:.1f}" if d else "", f"{d['val_loss']:.3f}" if d else "",
             f"{a['val_ppl']:.1f}" if a else "", f"{a['val_nll']:.3f}" if a else ""]
    print(f"| {step} | " + " | ".join(cells) + " |")
EOF
fi

# 1. generative perplexity (SmolLM2-135M judge) + unigram entropy vs NFE: linear vs cubic kappa, +/- corrector
if has genppl; then
  run "${LAUNCH[@]}" --model "$MODEL" --tasks genppl --presets $PRESETS --nfe $GENPPL_NFE \
    --genppl_samples "$GENPPL_SAMPLES" --genppl_length 128 --judge smollm2 "${COMMON[@]}" --output_dir "$OUT/genppl"
fi

# 2. single-line infilling of held-out stdlib functions (128-token windows = the training length), exact match
if has infill; then
  run "${LAUNCH[@]}" --model "$MODEL" --tasks stdlib_infill --presets $PRESETS --nfe $INFILL_NFE \
    --max_examples "$INFILL_EXAMPLES" --context_tokens 128 "${COMMON[@]}" --output_dir "$OUT/stdlib_infill"
fi

# 3. HumanEval: completion (pass@1 / pass@10 from n samples), oracle length, single-line infilling
if has humaneval; then
  run "${LAUNCH[@]}" --model "$MODEL" --tasks humaneval humaneval_oracle humaneval_infill --presets $HE_PRESETS \
    --nfe $HE_NFE --max_examples "$HE_EXAMPLES" --num_samples "$HE_SAMPLES" --gen_length 128 --context_tokens 256 \
    "${COMMON[@]}" --output_dir "$OUT/humaneval"
fi

# 4. autoregressive baseline (same width/depth/vocab/data/steps) vs the DFM model at the same number of steps
if has ar; then
  STEP=${AR_STEP:-$(python - "$AR_DIR" "$CKPT_DIR" <<'EOF'
import glob, os, sys
ar = {int(d.rsplit("-", 1)[1]) for d in glob.glob(os.path.join(sys.argv[1], "step-*")) if d.rsplit("-", 1)[1].isdigit()}
dfm = {int(f.rsplit("-", 1)[1].split(".")[0]) for f in glob.glob(os.path.join(sys.argv[2], "step-*.safetensors"))}
print(max(ar & dfm))
EOF
)}
  BUNDLED_STEP=${BUNDLED_STEP:-$(python - "$MODEL" <<'EOF'
import json, os, re, sys
log = next((os.path.join(sys.argv[1], "logs", n) for n in ("metrics.jsonl", "training_metrics.jsonl") if os.path.isfile(os.path.join(sys.argv[1], "logs", n))), "")
if os.path.isfile(log):
    print(max(json.loads(line).get("step", 0) for line in open(log, encoding="utf-8")))
else:
    card = open(os.path.join(sys.argv[1], "README.md"), encoding="utf-8").read()
    match = re.search(r"\| step \| (\d+) \||(\d+) steps \(", card)
    print(next(g for g in match.groups() if g) if match else "")
EOF
)}
  MODELS=("$AR_DIR/step-$STEP")
  if [ "$STEP" != "$BUNDLED_STEP" ]; then  # the bundled pipeline folder with the step-$STEP weights
    DFM_K="$OUT/dfm-step-$STEP"
    MODELS+=("$DFM_K")
    if [ ! -f "$DFM_K/model_index.json" ]; then
      run python - "$MODEL" "$CKPT_DIR/step-$STEP.safetensors" "$DFM_K" <<'EOF'
import os, shutil, sys
from safetensors.torch import load_file
src, weights, dst = sys.argv[1:]
tmp = dst + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
shutil.copytree(src, tmp)
target = os.path.join(tmp, "model", "model.safetensors")
if set(load_file(weights)) != set(load_file(target)):
    raise SystemExit(f"{weights}: its tensors do not match {target}")
shutil.copyfile(weights, target)
os.replace(tmp, dst)
EOF
    fi
  fi  # at the bundled model's own step count its numbers are those of parts 1 and 2
  for M in "${MODELS[@]}"; do
    NAME=$(basename "$M")
    case "$NAME" in step-*) NAME="ar-$NAME"; P="ar-sample ar-greedy"; Q="$P" ;;
                    *) P="linear-euler cubic-euler"; Q="linear-euler confidence" ;; esac
    run "${LAUNCH[@]}" --model "$M" --tasks genppl --presets $P --nfe 128 --genppl_samples "$GENPPL_SAMPLES" \
      --genppl_length 128 --judge smollm2 "${COMMON[@]}" --output_dir "$OUT/same-steps/$NAME-genppl"
    run "${LAUNCH[@]}" --model "$M" --tasks stdlib_infill --presets $Q --nfe 32 --max_examples "$INFILL_EXAMPLES" \
      --context_tokens 128 "${COMMON[@]}" --output_dir "$OUT/same-steps/$NAME-infill"
  done
fi
# 5. every sweep's tables, each with the command that produced it -> $OUT/tables.md (docs/paper_tables.md quotes it)
if has render; then
  python - "$OUT" <<'EOF'
import glob, os, sys
out = sys.argv[1]
commands = [line[2:].strip() for line in open(os.path.join(out, "commands.txt"), encoding="utf-8") if line.startswith("+ ")]
parts = []
for md in sorted(glob.glob(os.path.join(out, "**", "results.md"), recursive=True)):
    folder = os.path.dirname(md)
    used = [c for c in commands if f"--output_dir {folder}" in c + " " or c.endswith(f"--output_dir {folder}")]
    text = open(md, encoding="utf-8").read().split("\n## All cells")[0].replace("# Evaluation results", f"## {folder}")
    parts.append(text.replace("\n## ", "\n### ").replace("\n### " + folder, "\n## " + folder, 1))
    parts.append("Commands:\n\n```\n" + "\n".join(dict.fromkeys(used)) + "\n```\n")
# a softer, post-hoc infilling score: mean difflib similarity of each stripped sample to its reference (0..1)
import difflib, json
rows = ["| samples file | exact match | mean similarity |", "|---|---|---|"]
for path in sorted(glob.glob(os.path.join(out, "**", "samples", "*infill*.jsonl"), recursive=True)):
    recs = [json.loads(line) for line in open(path, encoding="utf-8")]
    pairs = [(r["reference"].strip(), s.strip()) for r in recs for s in r["samples"]]
    sim = sum(difflib.SequenceMatcher(None, a, b).ratio() for a, b in pairs) / len(pairs)
    em = sum(a == b for a, b in pairs) / len(pairs)
    rows.append(f"| {os.path.relpath(path, out)} | {em:.3f} | {sim:.3f} |")
parts.append("## Infilling: similarity of the filled line to the original\n\n" + "\n".join(rows) + "\n")
open(os.path.join(out, "tables.md"), "w", encoding="utf-8").write("\n".join(parts))
print(os.path.join(out, "tables.md"))
EOF
fi
echo "done: $OUT" >&2
