"""LoRA / QLoRA step throughput and memory: handloom vs transformers + PEFT, same shape, same recipe.

    python bench/lora.py                    # llama-3.2-1b shape, r=16 on all linear layers, batch 8 x 2048
    python bench/lora.py --preset tiny --seq_len 64 --micro_batch 2 --device cpu --nf4_scaler_block_size 16

Every row: a bf16 frozen base (ours: stored bf16 or NF4; PEFT: the model loaded in bf16), float32
adapters, bf16 autocast, AdamW on the adapters, random tokens. MFU counts the LoRA step as 4N FLOPs
per token (forward 2N, backward through the activations 2N; no weight gradients for the frozen
base) plus attention.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain import HEADER, fresh_memory, measure, print_row  # noqa: E402

from checkpoints.hf import config_to_hf  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.lora import apply_lora, init_lora_weights, mark_only_lora_trainable, quantize_base_nf4  # noqa: E402
from train.config import ParallelConfig  # noqa: E402
from train.dist import DistInfo  # noqa: E402
from train.parallel import parallelize  # noqa: E402


def ours(cfg, device, args, nf4: bool, ac: bool):
    with torch.device("meta"):
        model = GPT(cfg)
    apply_lora(model, "all-linear", r=args.r, alpha=2 * args.r)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    init_lora_weights(model, seed=0)
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.no_grad():  # frozen base in bf16, adapters float32 (as model.lora.freeze_base stores them)
        for name, p in model.named_parameters():
            if not name.endswith((".lora_A", ".lora_B")):
                p.data = p.data.to(base_dtype)
    if nf4:
        quantize_base_nf4(model, scaler_block_size=args.nf4_scaler_block_size, dtype=torch.bfloat16)
    mark_only_lora_trainable(model)
    parallelize(model, ParallelConfig(compile=args.compile, activation_checkpointing=ac),
                DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    return model, lambda ids, targets: model(ids, targets=targets)


def peft_model(cfg, device, args, nf4: bool, ac: bool):
    import peft
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(cfg, torch.bfloat16))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    return model, lambda ids, targets: model(input_ids=ids, labels=ids, use_cache=False).loss * ids.numel()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--nf4_scaler_block_size", type=int, default=256, help="QLoRA rows (the tiny preset needs 16)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compile our blocks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="after each row's timed steps, profile 3 steps "
                   "(bench/kernels.py: GPU time by part, longest kernels)")
    p.add_argument("--rows", default="ours lora,ours lora ac,ours qlora,ours qlora ac,peft,peft ac")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = ModelConfig.preset(args.preset)
    # LoRA step FLOPs: forward 2N + activation gradients 2N (frozen weights get no gradient) + attention.
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size
    flops = 4 * n + 8 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.seq_len / 2
    print(f"# LoRA r={args.r} all-linear on {args.preset} ({cfg.num_params() / 1e9:.2f}B), batch {args.micro_batch} x "
          f"{args.seq_len}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(HEADER)
    for name in args.rows.split(","):
        fresh_memory(device)
        # Each row compiles afresh: one row's compiled blocks would otherwise stay cached on the shared
        # Block.forward, and the next row's (other parameter types) would show as recompilations.
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        build = peft_model if name.startswith("peft") else ours
        try:
            model, forward = build(cfg, device, args, nf4="qlora" in name, ac=name.endswith(" ac"))
            print_row(measure(name, model, forward, cfg, args, device, flops_per_token=flops))
            if build is ours and args.compile:
                # Two graphs: the first block's input needs no gradient (frozen embeddings), the others' do.
                counters = torch._dynamo.utils.counters
                print(f"{'':20s} compiled graphs {counters['stats']['unique_graphs']}, "
                      f"graph breaks {sum(counters['graph_break'].values())}", flush=True)
            del model, forward
        except Exception as e:  # an OOM or a failed compile ends this row, not the table
            print(f"{name:20s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main()
