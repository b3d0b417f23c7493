"""The budget of one pretraining step, before any profile: FLOPs and bytes of each part, and the time
each should take at the card's measured ceilings (issue 13's method: predict, then measure).

    python bench/budget.py                                   # llama-3.2-1b, 8 x 2048, H200 ceilings
    python bench/budget.py --micro_batch 2 --seq_len 8192
    python bench/budget.py --measured_tokens_per_s 56500     # compare with a bench/pretrain.py row

The recipe is bench/pretrain.py's: fp32 master weights, bf16 autocast, compiled blocks, the chunked
output projection + cross-entropy, fused AdamW, gradient clipping, no activation checkpointing
(--checkpointing adds one forward of the blocks). Each part's time is the larger of its FLOPs at
the matmul (or attention) ceiling and its bytes at the copy bandwidth: a roofline per part, with no
overlap between parts. Byte counts are of what a fused (compiled) implementation must move at
least; elementwise work counts one read of each input and one write of each output. Ceilings
default to what this project measured on an H200 (bench/RESULTS.md): 789 TFLOP/s for a large bf16
matmul, 396 TFLOP/s for cuDNN causal attention forward (backward assumed the same rate), and 4.3 TB/s
copy bandwidth. MFU is counted as bench/pretrain.py counts it (ModelConfig.flops_per_token).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig  # noqa: E402

PEAK = 989e12


def budget(cfg: ModelConfig, B: int, T: int, checkpointing: bool) -> list[tuple[str, float, float, str]]:
    """(part, FLOPs, bytes, kind) of one training step; kind picks the ceiling: matmul, attention or memory."""
    n = B * T  # tokens
    C, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    HD, KD = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    block_params = C * (HD + 2 * KD) + HD * C + 3 * C * I  # q/k/v, o, gate/up/down
    params = cfg.num_params()
    forwards = 2 if checkpointing else 1  # the recompute is one more forward of the blocks
    parts = []
    # Matmuls: 2 FLOPs per weight per token forward, 4 backward (the input's and the weight's gradients).
    parts.append(("block matmuls (q/k/v, o, gate/up, down)", (2 * forwards + 4) * block_params * L * n,
                  0, "matmul"))
    # Causal attention: QK^T and PV over T/2 keys on average, 2 FLOPs each; backward 2.5x forward.
    attn_fwd = 2 * 2 * (T / 2) * HD * L * n
    parts.append(("attention (causal, flash)", attn_fwd * (forwards + 2.5), 0, "attention"))
    parts.append(("output projection (chunked)", 6 * C * V * n, 0, "matmul"))
    # The loss over V per token: the logits chunk written in bf16 and read back for the logsumexp,
    # then the softmax gradient written and read by the two backward matmuls.
    parts.append(("softmax + cross-entropy over V", 0, n * V * (2 + 2 + 2 + 2), "memory"))
    # Per token and layer, forward: two RMSNorms (read the float32 stream, write bf16), two residual
    # adds (read float32 + bf16, write float32), RoPE on q and k (read + write bf16), SiLU-product
    # (read gate and up, write the product). Backward moves about twice as much.
    fwd_bytes = 2 * (4 + 2) * C + 2 * (4 + 2 + 4) * C + 2 * 2 * (HD + KD) + 3 * 2 * I
    parts.append(("elementwise in blocks (norms, adds, RoPE, SiLU)", 0, (forwards + 2) * fwd_bytes * L * n, "memory"))
    # Autocast casts every fp32 weight to bf16 once per forward (read 4, write 2 bytes).
    parts.append(("weight casts to bf16", 0, forwards * 6 * params, "memory"))
    # Weight gradients land in float32 (bf16 product read, float32 written).
    parts.append(("weight gradients to float32", 0, (2 + 4) * params, "memory"))
    # Clipping reads every gradient for the norm, then scales them in place (read + write).
    parts.append(("gradient clipping", 0, (4 + 8) * params, "memory"))
    # Fused AdamW reads parameter, gradient and both moments (16 bytes) and writes three (12).
    parts.append(("AdamW (fused)", 0, 28 * params, "memory"))
    # Embedding: rows gathered forward; backward zeroes the float32 table gradient and adds rows into it.
    parts.append(("embedding forward + backward", 0, 4 * C * n * 3 + 4 * V * C, "memory"))
    return parts


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing: one more forward of the blocks")
    p.add_argument("--matmul_tflops", type=float, default=789.0)
    p.add_argument("--attention_tflops", type=float, default=396.0)
    p.add_argument("--bandwidth_tbs", type=float, default=4.3)
    p.add_argument("--measured_tokens_per_s", type=float, default=None, help="a measured rate to set beside the budget")
    args = p.parse_args()
    cfg = ModelConfig.preset(args.preset)
    B, T = args.micro_batch, args.seq_len
    ceilings = {"matmul": args.matmul_tflops * 1e12, "attention": args.attention_tflops * 1e12}
    rows, total = [], 0.0
    for name, flops, nbytes, kind in budget(cfg, B, T, args.checkpointing):
        seconds = max(flops / ceilings[kind] if kind in ceilings else 0.0, nbytes / (args.bandwidth_tbs * 1e12))
        rows.append((name, flops, nbytes, seconds))
        total += seconds
    tokens = B * T
    print(f"# {args.preset}: {cfg.num_params() / 1e9:.2f}B params, batch {B} x {T}"
          f"{', activation checkpointing' if args.checkpointing else ''}; ceilings: matmul {args.matmul_tflops:.0f} "
          f"TFLOP/s, attention {args.attention_tflops:.0f} TFLOP/s, {args.bandwidth_tbs} TB/s")
    print(f"| part | TFLOP | GB moved | ms at the ceiling | share |\n| --- | ---: | ---: | ---: | ---: |")
    for name, flops, nbytes, seconds in rows:
        print(f"| {name} | {flops / 1e12:.1f} | {nbytes / 1e9:.1f} | {seconds * 1e3:.1f} | {seconds / total:.0%} |")
    mfu = cfg.flops_per_token(T) * tokens / total / PEAK
    print(f"| **step** | | | **{total * 1e3:.1f}** | |")
    print(f"# budget: {tokens / total:,.0f} tokens/s, {mfu:.1%} MFU (of {PEAK / 1e12:.0f} TFLOP/s)")
    if args.measured_tokens_per_s:
        measured = tokens / args.measured_tokens_per_s
        print(f"# measured: {args.measured_tokens_per_s:,.0f} tokens/s = {measured * 1e3:.1f} ms a step, "
              f"{measured - total:+.3f} s over the budget ({total / measured:.0%} of it explained)")


if __name__ == "__main__":
    main()
