"""Longest sequence that trains at batch 1 on one GPU: handloom against transformers with gradient checkpointing.

    python bench/long_context.py --lengths 131072,262144 --timeout_s 280       # llama-3.2-1b, full fine-tuning
    python bench/long_context.py --lengths 524288 --hf_lengths "" --timeout_s 560   # 512k: one length per command
    python bench/long_context.py --lengths "" --hf_lengths 32768,65536,131072  # the peer alone
    python bench/long_context.py --preset llama-3.1-8b --qlora                 # 8B, QLoRA r=16 all-linear
    python bench/long_context.py --check_loss_at 32768                         # options on == off, within bf16
    python bench/long_context.py --device cpu --preset tiny --lengths 256,512 --hf_lengths 256 \
        --mlp_chunk_tokens 64 --nf4_scaler_block_size 16                       # smoke test (add --qlora too)

Every row trains one sequence of random tokens (batch 1) for --steps steps (the first compiles and warms up,
the last is timed): bf16 autocast over float32 master weights, fused AdamW, the summed token loss / tokens,
gradient clipping; activation checkpointing always. Ours: compiled blocks (--compile) and train/parallel.py's
long-context options as flags (--mlp_chunk_tokens, --checkpoint_dtype, --offload). The peer: transformers'
AutoModelForCausalLM from the same config, SDPA attention, gradient checkpointing, the same optimizer and loss
(bench/pretrain.py's row), or with --qlora transformers + PEFT LoRA r=16 all-linear over a bf16 base
(bench/lora.py's row: bitsandbytes' 4-bit base is not installed). The sequence may exceed the preset's
max_seq_len: the benchmark raises it (RoPE has no table to outgrow).

Each length runs in its own process (fresh CUDA memory and compile), bounded by --timeout_s; a row reports
tokens/s and MFU of the timed step, the peak of torch.cuda.max_memory_allocated (and what the allocator
reserved), the process's peak host memory (offloaded activations live there), and whether it fit. Attention's
FLOPs grow with T^2: one step of the 1B at 524,288 tokens is ~6e16 model FLOPs (93% of them attention), 236 s
on an H200 with its compile (bench/RESULTS.md), so such a length wants a command (and a --timeout_s) of its
own; --steps 1 still reports its peak memory, its time then including the compile.

--check_loss_at T trains one step at T tokens twice, in two processes, with the options off (activation
checkpointing and compile only) and on, and compares the loss and the gradient norm: the chunked MLP and
offloading change no value, bf16 checkpoints only the recomputed forward that backward differentiates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora import peft_model  # noqa: E402  (bench/lora.py)
from pretrain import PEAK, hf  # noqa: E402  (bench/pretrain.py)

from model.config import ModelConfig  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.lora import LoRAConfig, apply_lora, freeze_base, init_lora_weights  # noqa: E402
from train.config import OptimConfig, ParallelConfig  # noqa: E402
from train.dist import DistInfo  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.parallel import parallelize  # noqa: E402

GiB = 2**30
# One step's results agree within these: the loss within bf16's rounding of one sum (2^-8 relative), the gradient
# norm within the rounding of a recompute from bf16 inputs through every layer (1%).
LOSS_TOLERANCE, GRAD_NORM_TOLERANCE = 2**-8, 1e-2


# ---------------------------------------------------------------------------------------------
# One row, in its own process
# ---------------------------------------------------------------------------------------------


def ours(cfg: ModelConfig, device: torch.device, args, options: bool):
    """The loops' setup order (train/sft.py): full fine-tuning parallelizes on meta; QLoRA swaps the adapters in,
    initialises, stores the frozen base as NF4, then parallelizes."""
    parallel = ParallelConfig(activation_checkpointing=True, compile=args.compile)
    if options:
        parallel = dataclasses.replace(parallel, mlp_chunk_tokens=args.mlp_chunk_tokens,
                                       checkpoint_dtype=args.checkpoint_dtype, offload_activations=args.offload)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    with torch.device("meta"):
        model = GPT(cfg)
    if not args.qlora:
        parallelize(model, parallel, dist)
        model.to_empty(device=device)
        model.init_weights(seed=0)
    else:
        lora = LoRAConfig(targets=["all-linear"], r=args.r, alpha=2 * args.r, quantize="nf4",
                          nf4_scaler_block_size=args.nf4_scaler_block_size)
        apply_lora(model, lora.targets, lora.r, lora.alpha)
        model.to_empty(device=device)
        model.init_weights(seed=0)
        init_lora_weights(model, seed=0)
        freeze_base(model, lora, device)
        parallelize(model, parallel, dist)
    return model, lambda ids, targets: model(ids, targets=targets)  # fused output projection + loss


def train_steps(model, forward, cfg: ModelConfig, seq_len: int, steps: int, device: torch.device) -> dict:
    """`steps` optimizer steps on one random sequence; the last one timed. The loss and gradient norm (before
    clipping) are the first step's: the same weights whatever the options."""
    model.train()
    optim = build_optimizer(model, OptimConfig(lr=1e-4), device)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), device=device, generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trainable = [p for p in model.parameters() if p.requires_grad]
    first = None
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(inputs, targets) / seq_len
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step == 0:
            first = {"loss": loss.item(), "grad_norm": grad_norm.item()}  # .item() waits for the GPU
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    return {**first, "step_s": elapsed, "tokens_per_s": seq_len / elapsed}


def flops_per_token(cfg: ModelConfig, seq_len: int, lora: bool) -> float:
    """Model FLOPs per token (no recompute), as bench/pretrain.py and bench/lora.py count them: 6N + attention
    for full training; 4N + 2/3 of the attention for LoRA (no weight gradients for the frozen base)."""
    if not lora:
        return cfg.flops_per_token(seq_len)
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size
    return 4 * n + 8 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len / 2


def worker(args) -> dict:
    """Build one implementation, train it at one length, report; an out-of-memory error is a result."""
    device = torch.device(args.device)
    cfg = model_config(args, args.seq_len)
    try:
        if args.impl == "ours":
            model, forward = ours(cfg, device, args, options=not args.plain)
        elif args.qlora:
            model, forward = peft_model(cfg, device, args, nf4=False, ac=True)
        else:
            model, forward = hf(cfg, device, compile=False, ac=True)
        if device.type == "cuda":  # the build's transients (QLoRA's float32 weights before NF4) are not the step's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out = train_steps(model, forward, cfg, args.seq_len, args.steps, device)
        out["status"] = "fits"
    except Exception as e:  # noqa: BLE001  (an OOM, inside compiled code too, ends the row, not the table)
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        out = {"status": "OOM" if oom else f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        out["reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    out["host_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB
    if "tokens_per_s" in out and device.type == "cuda":
        out["mfu"] = out["tokens_per_s"] * flops_per_token(cfg, args.seq_len, args.qlora) / PEAK
    return out


def model_config(args, seq_len: int) -> ModelConfig:
    cfg = ModelConfig.preset(args.preset)
    return dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len))


# ---------------------------------------------------------------------------------------------
# The table: one process per row
# ---------------------------------------------------------------------------------------------


def run_row(args, impl: str, seq_len: int, plain: bool = False, steps: int | None = None) -> dict:
    """Run worker() in a fresh process; past --timeout_s its whole process group (compile workers too) is killed."""
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--seq_len", str(seq_len),
           "--steps", str(steps or args.steps)] + args.passthrough + (["--plain"] if plain else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": f"timeout after {args.timeout_s:g} s"}
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"crashed (exit {proc.returncode}): {last[:160]}"}


HEADER = (f"{'implementation':22s} {'seq len':>9s} {'tokens/s':>9s} {'MFU':>6s} {'step s':>7s} {'peak GiB':>9s} "
          f"{'reserved':>9s} {'host GiB':>9s}  result")


def _format(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def print_row(name: str, seq_len: int, r: dict) -> None:
    def num(key, fmt):
        return _format(r.get(key), fmt)

    status = "does not fit (OOM)" if r["status"] == "OOM" else r["status"]
    print(f"{name:22s} {seq_len:>9,d} {num('tokens_per_s', ',.0f'):>9s} {num('mfu', '.1%'):>6s} "
          f"{num('step_s', '.1f'):>7s} {num('peak_gib', '.1f'):>9s} {num('reserved_gib', '.1f'):>9s} "
          f"{num('host_gib', '.1f'):>9s}  {status}", flush=True)


def check_loss(args) -> None:
    """One step at --check_loss_at tokens with the options off and on: the same loss and gradient norm."""
    T = args.check_loss_at
    results = {name: run_row(args, "ours", T, plain=name == "off", steps=1) for name in ("off", "on")}
    print(f"{'options':8s} {'loss':>12s} {'grad norm':>12s} {'peak GiB':>9s}  result")
    for name, r in results.items():
        loss, norm, peak = (_format(r.get(key), fmt) for key, fmt in (("loss", ".6f"), ("grad_norm", ".6f"),
                                                                       ("peak_gib", ".1f")))
        print(f"{name:8s} {loss:>12s} {norm:>12s} {peak:>9s}  {r['status']}")
    off, on = results["off"], results["on"]
    if off["status"] != "fits" or on["status"] != "fits":
        print("check: not run (a row did not train)")
        return
    loss_gap = abs(on["loss"] / off["loss"] - 1)
    norm_gap = abs(on["grad_norm"] / off["grad_norm"] - 1)
    ok = loss_gap <= LOSS_TOLERANCE and norm_gap <= GRAD_NORM_TOLERANCE
    print(f"check at {T:,d} tokens: loss differs by {loss_gap:.2e} (tolerance {LOSS_TOLERANCE:.1e}), gradient norm "
          f"by {norm_gap:.2e} (tolerance {GRAD_NORM_TOLERANCE:.0e}): {'PASS' if ok else 'FAIL'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--qlora", action="store_true", help="QLoRA: NF4 frozen base, LoRA r on all linear layers")
    p.add_argument("--lengths", default=None,
                   help="our lengths, comma-separated (default 131072,262144,524288; with --qlora 65536,131072)")
    p.add_argument("--hf_lengths", default=None,
                   help="the peer's lengths (default 32768,65536,131072; with --qlora 32768,65536); '' for none")
    p.add_argument("--check_loss_at", type=int, default=0, help="instead of the table: options on vs off at T tokens")
    p.add_argument("--mlp_chunk_tokens", type=int, default=16384, help="parallel.mlp_chunk_tokens (0: off)")
    p.add_argument("--checkpoint_dtype", choices=["same", "bf16"], default="bf16", help="parallel.checkpoint_dtype")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=False,
                   help="parallel.offload_activations")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile our blocks (default: on GPU)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (--qlora)")
    p.add_argument("--nf4_scaler_block_size", type=int, default=256, help="QLoRA (the tiny preset needs 16)")
    p.add_argument("--steps", type=int, default=2, help="steps per row; the last is timed")
    p.add_argument("--timeout_s", type=float, default=540, help="wall-clock limit of each row's process")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # Set by run_row for the process of one row.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "peer"], default="ours", help=argparse.SUPPRESS)
    p.add_argument("--seq_len", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    # What every row's process gets (the row adds --impl, --seq_len, --steps).
    args.passthrough = ["--preset", args.preset, "--device", args.device, "--mlp_chunk_tokens",
                        str(args.mlp_chunk_tokens), "--checkpoint_dtype", args.checkpoint_dtype, "--r", str(args.r),
                        "--nf4_scaler_block_size", str(args.nf4_scaler_block_size),
                        "--compile" if args.compile else "--no-compile"] + (["--offload"] if args.offload else []) \
        + (["--qlora"] if args.qlora else [])
    cfg = ModelConfig.preset(args.preset)
    device = torch.device(args.device)
    recipe = f"QLoRA r={args.r} all-linear (NF4 base)" if args.qlora else "full fine-tuning, fp32 master weights"
    where = f"bf16 autocast; {torch.cuda.get_device_name()}" if device.type == "cuda" else "float32; cpu"
    print(f"# {args.preset}: {cfg.num_params() / 1e9:.2f}B params, batch 1, {recipe}, AdamW, activation checkpointing, "
          f"{where}, torch {torch.__version__}")
    print(f"# ours: compile {'on' if args.compile else 'off'}, mlp_chunk_tokens {args.mlp_chunk_tokens}, "
          f"checkpoint_dtype {args.checkpoint_dtype}, offload_activations {args.offload}")
    if args.check_loss_at:
        check_loss(args)
        return
    default_ours, default_peer = ("65536,131072", "32768,65536") if args.qlora else \
        ("131072,262144,524288", "32768,65536,131072")
    ours_lengths = args.lengths if args.lengths is not None else default_ours
    peer_lengths = args.hf_lengths if args.hf_lengths is not None else default_peer
    rows = [("ours", int(n)) for n in ours_lengths.split(",") if n]
    rows += [("peer", int(n)) for n in peer_lengths.split(",") if n]
    peer = "transformers+PEFT" if args.qlora else "transformers"
    print(HEADER)
    for impl, seq_len in rows:
        print_row("ours" if impl == "ours" else peer, seq_len, run_row(args, impl, seq_len))


if __name__ == "__main__":
    main()
