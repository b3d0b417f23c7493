"""Activation checkpointing with torch.compile: which wraps which.

    python bench/ac_order.py            # llama-3.2-1b shape, 8 x 2048, forward + backward, bf16 autocast

Two ways to combine them per block: the checkpoint inside the compiled block (compile traces through
torch.utils.checkpoint: `block.forward = checkpointed; block.compile()`), or the compiled forward
inside the checkpoint (`block.forward = checkpoint(torch.compile(block.forward))`, what
train/parallel.py does). Prints tokens/s and peak memory of each, no optimizer step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig  # noqa: E402
from model.gpt import GPT  # noqa: E402
from train.parallel import _checkpoint_block  # noqa: E402


def build(order: str, preset: str) -> GPT:
    with torch.device("meta"):
        model = GPT(ModelConfig.preset(preset))
    for block in model.layers:
        if order == "checkpoint inside compile":  # what train/parallel.py did before
            _checkpoint_block(block)
            block.compile()
        else:  # what it does now
            _checkpoint_block(block, torch.compile(block.forward))
    model.to_empty(device="cuda")
    model.init_weights(seed=0)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    print(f"| order | tokens/s | peak GiB |  ({args.preset}, {args.batch} x {args.seq}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__})")
    for order in ("checkpoint inside compile", "compile inside checkpoint"):
        model = build(order, args.preset)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        for i in range(3 + args.steps):
            if i == 3:  # after compilation
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(ids, targets=ids)
            loss.backward()
            for param in model.parameters():
                param.grad = None
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / args.steps
        print(f"| {order} | {args.batch * args.seq / seconds:,.0f} | {torch.cuda.max_memory_allocated() / 2**30:.1f} |",
              flush=True)
        del model, ids
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
