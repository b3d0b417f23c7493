"""LoRA and QLoRA fine-tuning on chat data: the SFT loop (train/sft.py) with a `lora:` section on.

    python -m train.lora --config configs/lora/qwen2.5-0.5b-fastchat.yaml
    python -m train.lora --config configs/lora/qwen2.5-0.5b-fastchat.yaml --lora.quantize nf4   # QLoRA
    torchrun --nproc_per_node=8 -m train.lora --config configs/lora/qwen2.5-0.5b-fastchat.yaml

LoRA changes which parameters train, not the algorithm, so it is an option of every fine-tuning
loop (`lora:` in any SFT, DPO or GRPO config) rather than a loop of its own. This entry only
changes the defaults: the section is on (LoRAConfig's defaults: all-linear, r=16, alpha=32), the
run folder is runs/lora and the learning rate 2e-4. At the end `<out_dir>/final/` is a PEFT adapter.
"""

from train.config import parse_config
from train.sft import SFTConfig, main

LORA_DEFAULTS = {"out_dir": "runs/lora", "lora": {}, "optim.lr": 2e-4}

if __name__ == "__main__":
    main(parse_config(SFTConfig, defaults=LORA_DEFAULTS))
