"""Fine-tune a saved DFM pipeline with a LoRA adapter (PEFT); see `--help` for the flags.

python examples/finetune_lora.py --pretrained_model_name_or_path runs/dfm --train_file my_code/ \
    --validation_file my_val/ --seq_len 128 --max_train_steps 300 --output_dir runs/dfm-lora --merge

Then: pipe = DFMPipeline.from_pretrained("runs/dfm"); pipe.load_lora_weights("runs/dfm-lora").
Two CPU processes (a real gloo group):  torchrun --nproc_per_node 2 examples/finetune_lora.py ...
"""

from dfm_hf.training.lora_finetune import main

if __name__ == "__main__":
    main()
