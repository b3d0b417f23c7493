"""Pretraining step throughput: handloom vs Hugging Face transformers, same shape, same recipe.

    python bench/pretrain.py                                   # llama-3.2-1b shape, seq 2048, one GPU
    python bench/pretrain.py --float8                          # also ours with parallel.float8 (SM89+)
    python bench/pretrain.py --preset tiny --seq_len 128 --micro_batch 2 --device cpu   # smoke test

Every model trains on random tokens with the same recipe: fp32 master weights, bf16 autocast,
fused AdamW, loss = summed token cross-entropy / tokens, gradient clipping. Each row reports
tokens/s, MFU (model FLOPs per token from model/config.py against 989 TFLOP/s dense bf16, for
the float8 rows too, as torchtitan counts them), and peak memory. Rows run one after another in
one process, memory freed in between. The float8 rows (`--float8`, or named in `--rows`) swap the
blocks' linear layers for torchao's Float8Linear (train/parallel.py); on CPU the float8 matmuls
are emulated, so there they only show that the row runs.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from algos.logprobs import cross_entropy_sum  # noqa: E402
from kernels import print_gpu_time  # noqa: E402
from checkpoints.hf import config_to_hf  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.gpt import GPT  # noqa: E402
from train.config import OptimConfig, ParallelConfig  # noqa: E402
from train.dist import DistInfo  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.parallel import parallelize  # noqa: E402

PEAK = 989e12


def ours(cfg: ModelConfig, device, compile: bool, ac: bool, float8: bool = False):
    with torch.device("meta"):
        model = GPT(cfg)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    parallelize(model, ParallelConfig(compile=compile, activation_checkpointing=ac, float8=float8), dist)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    return model, lambda ids, targets: model(ids, targets=targets)  # fused output projection + loss


def hf(cfg: ModelConfig, device, compile: bool, ac: bool):
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(cfg, torch.float32))
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    if ac:
        model.gradient_checkpointing_enable()
    if compile:
        model.compile()
    return model, lambda ids, targets: cross_entropy_sum(model(ids, use_cache=False).logits, targets)


def measure(name, model, forward, cfg, args, device, flops_per_token=None):
    """Train `model` for warmup + timed steps on random tokens; forward(ids, targets) -> summed loss.
    Only parameters with requires_grad are optimised (LoRA benches pass models with a frozen base)."""
    model.train()
    optim = build_optimizer(model, OptimConfig(lr=1e-4), device)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), device=device, generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    tokens = inputs.numel()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(inputs, targets) / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss = loss.item()  # waits for the GPU
    elapsed = time.perf_counter() - t0
    if args.profile and device.type == "cuda":
        print_kernel_table(name, step, elapsed / args.steps)
    tps = tokens * args.steps / elapsed
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    flops = flops_per_token or cfg.flops_per_token(args.seq_len)
    mfu = tps * flops / PEAK if device.type == "cuda" else float("nan")
    return {"name": name, "tokens_per_s": tps, "mfu": mfu, "peak_gib": peak_mem, "loss": loss}


def print_kernel_table(name, step, seconds_per_step, steps=3):
    """Profile `steps` more steps and print where the GPU's time went (bench/kernels.py). Compare the
    parts with `python bench/budget.py`."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print_gpu_time(name, prof, steps, seconds_per_step * 1e3)


def fresh_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def print_row(r):
    print(f"{r['name']:20s} {r['tokens_per_s']:10,.0f} {100 * r['mfu']:5.1f}% {r['peak_gib']:9.1f} {r['loss']:8.4f}",
          flush=True)


HEADER = f"{'implementation':20s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s} {'loss':>8s}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ac", action="store_true", help="activation checkpointing for every row")
    p.add_argument("--compile", action="store_true", help="also compile the non-'compiled' rows")
    p.add_argument("--rows", default="ours,ours compiled,hf eager,hf compiled")
    p.add_argument("--profile", action="store_true",
                   help="after each row's timed steps, profile 3 steps: GPU time by part (as bench/budget.py splits "
                        "a step) and the longest kernels")
    p.add_argument("--float8", action="store_true",
                   help="also time ours with parallel.float8 ('ours float8 compiled' after 'ours compiled')")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = ModelConfig.preset(args.preset)
    float8 = functools.partial(ours, float8=True)
    builders = {"ours": ours, "ours compiled": ours, "ours float8": float8, "ours float8 compiled": float8,
                "hf eager": hf, "hf compiled": hf}
    rows = args.rows.split(",")
    if args.float8 and "ours float8 compiled" not in rows:
        # Beside the bf16 row it is compared with (float8 without compile runs its casts as separate kernels).
        at = rows.index("ours compiled") + 1 if "ours compiled" in rows else len(rows)
        rows.insert(at, "ours float8 compiled")
    print(f"# {args.preset}: {cfg.num_params() / 1e9:.2f}B params, batch {args.micro_batch} x {args.seq_len}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(HEADER)
    for name in rows:
        fresh_memory(device)
        try:
            model, forward = builders[name](cfg, device, args.compile or "compiled" in name, args.ac)
            print_row(measure(name, model, forward, cfg, args, device))
            del model, forward
        except Exception as e:  # an OOM or a failed compile ends this row, not the table
            print(f"{name:20s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main()
