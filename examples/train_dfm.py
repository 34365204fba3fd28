"""Train a Discrete Flow Matching model (same flags as `dfm-hf train`; see `--help`).

One process:  python examples/train_dfm.py --stdlib --output_dir runs/dfm --max_train_steps 2000
Two CPU processes (a real gloo group):  torchrun --nproc_per_node 2 examples/train_dfm.py --stdlib ...

Adapt a causal LM (DiffuLLaMA-style: attention annealing, 1/t-weighted masked CE, LoRA + the mask row):
  python examples/train_dfm.py --stdlib --init_from_causal_lm HuggingFaceTB/SmolLM2-135M-Instruct \
      --attention_annealing_steps 100 --loss_weighting inverse_t --lora_r 32 --mixed_precision bf16 \
      --seq_len 256 --train_batch_size 4 --learning_rate 1e-3 --output_dir runs/smollm2-dfm
  (a GGUF: --init_from_causal_lm FOLDER --gguf_file NAME.gguf; see examples/train_default_model.sh)
Block diffusion (blocks of 4 positions, BD3-LM's objective [x_t | x_1] in one forward, complementary masks):
  python examples/train_dfm.py --stdlib --init_from_causal_lm HuggingFaceTB/SmolLM2-135M-Instruct \
      --block_size 4 --complementary_masks --loss_weighting inverse_t --seq_len 256 --output_dir runs/smollm2-bd
Supervised fine-tuning (prompt/completion or chat messages jsonl; the prompt conditions, the response is scored):
  python examples/train_dfm.py --init_from_pretrained GSAI-ML/LLaDA-8B-Instruct --sft --train_file sft.jsonl ...
"""

from dfm_hf.training.train import main

if __name__ == "__main__":
    main()
