#!/usr/bin/env bash
# Reproduce the bundled model (src/dfm_hf/bundled/dfm-code-stdlib) on a 2-core CPU.
# Data: this interpreter's standard library sources (no test folders), 5% of files held out by path hash.
# Constant learning rate after warmup, so a run cut by --max_train_minutes equals a run of that many steps.
# The bundled model: MAX_STEPS=13358 MAX_MINUTES=100000 (it was trained in two invocations, the second resumed).
set -euo pipefail
OUT=${1:-runs/dfm-code-stdlib}
python examples/train_dfm.py \
  --stdlib --validation_fraction 0.05 \
  --tokenizer_vocab_size 4096 \
  --model_config small \
  --model_config_overrides '{"num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 512, "time_conditioning": false}' \
  --seq_len 128 --train_batch_size 16 --gradient_accumulation_steps 1 \
  --learning_rate 2e-3 --lr_scheduler constant_with_warmup --warmup_steps 100 --weight_decay 0.01 \
  --coupling unconditional:0.2,prefix:0.4,infill:0.4 --loss ce --time_sampling stratified \
  --max_train_steps ${MAX_STEPS:-100000} --max_train_minutes ${MAX_MINUTES:-80} \
  --checkpointing_steps 250 --eval_steps 500 --eval_batches 16 --logging_steps 25 \
  --seed 0 --no_progress --output_dir "$OUT"
