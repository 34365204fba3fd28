"""Fine-tune a saved DFM pipeline with a LoRA adapter (PEFT); see `--help` for the flags.

python examples/finetune_lora.py --pretrained_model_name_or_path runs/dfm --train_file my_code/ \
    --validation_file my_val/ --seq_len 128 --max_train_steps 300 --output_dir runs/dfm-lora --merge

Then: pipe = DFMPipeline.from_pretrained("runs/dfm"); pipe.load_lora_weights("runs/dfm-lora").

A released model (converted on load; LoRA on the same q/k/v/o/gate/up/down projections) on SFT data:
python examples/finetune_lora.py --pretrained_model_name_or_path Dream-org/Dream-v0-Instruct-7B --sft \
    --train_file chat.jsonl --seq_len 512 --max_train_steps 500 --output_dir runs/dream-lora
(jsonl rows: {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}: the prompt,
with the chat template for messages, conditions; only the response and its EOS are corrupted and scored.)
Then: pipe = DFMPipeline.from_pretrained("Dream-org/Dream-v0-Instruct-7B"); pipe.load_lora_weights("runs/dream-lora").
A block-diffusion adapter (--block_size 4: the base trained as a block model; --merge saves it with its block size):
python examples/finetune_lora.py --pretrained_model_name_or_path runs/dfm --train_file my_code/ --block_size 4 \
    --seq_len 128 --max_train_steps 300 --output_dir runs/dfm-block-lora --merge
Two CPU processes (a real gloo group):  torchrun --nproc_per_node 2 examples/finetune_lora.py ...
"""

from dfm_hf.training.lora_finetune import main

if __name__ == "__main__":
    main()
