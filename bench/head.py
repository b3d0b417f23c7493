"""The output head's softmax work, kernel by kernel: how close each fused chunk kernel runs to the bandwidth.

    python bench/head.py                                                      # llama-3.2-1b head, bf16, one GPU
    python bench/head.py --device cpu --tokens 512 --hidden 64 --vocab 4096   # smoke test

algos/logprobs.py runs the output projection and its softmax one chunk of tokens at a time (about 2^28 / V
tokens: 2,092 at V = 128,256). Per chunk: the logits matmul, then two compiled functions over the (n, V)
logits, `_chunk_logsumexp_picked` (each row's logsumexp and target logit) and `_chunk_logits_grad` (scale x
(one_hot - softmax), in the logits' dtype), then the hidden and weight gradients' matmuls. A profile of the
LoRA step (bench/RESULTS.md, sixth session) put the two softmax kernels at 0.66 and 0.98 ms a chunk, about
5x and 4x the time their bytes need at the copy bandwidth, while the matmuls run near the card's ceiling.

Table 1, one chunk, by how the two functions are compiled (each variant compiled afresh):
  dynamic   torch.compile(dynamic=True): one kernel for every chunk length and vocabulary (the loops' choice)
  static    dynamic=False: compiled for this chunk's shape
  rows      the chunk's length symbolic (torch._dynamo.mark_dynamic), the vocabulary a constant
  tuned     static, with inductor's coordinate-descent tuning of block sizes and warps
  triton    two kernels written below (GPU, or triton's interpreter on the CPU with TRITON_INTERPRET=1):
            a one-pass logsumexp, and the gradient over a (row, column block) grid
ms a chunk for each function, and against the bytes each must move (lse: read the logits once; grad: read
them and write the gradient) at the copy bandwidth measured in the same run; the chunk's three matmuls for
scale. Each variant's outputs are checked against the eager functions first.

Table 2, the whole head, forward and backward over --tokens tokens: linear_cross_entropy_sum at several chunk
lengths, and at the default length with each variant's kernels in place of the loops' own, against PyTorch's
own path (F.linear, then F.cross_entropy on float32 logits): ms and peak memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import copy_bandwidth  # noqa: E402  (bench/generate.py)

from algos import logprobs  # noqa: E402


def timed_ms(fn, device, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def compiled(fn, variant: str):
    """fn compiled as `variant` says; compiling happens at the first call, inside the returned wrapper."""
    opts = {"coordinate_descent_tuning": True} if variant == "tuned" else {}
    inner = torch.compile(fn, dynamic=True if variant == "dynamic" else None if variant == "rows" else False)

    def call(*args):
        if variant == "rows":  # the chunk's length symbolic (every chunk shares the kernel), the vocabulary fixed
            for a in args:
                torch._dynamo.mark_dynamic(a, 0)
        with torch._inductor.config.patch(opts):
            return inner(*args)
    return call


# ---- A one-pass alternative, written here to measure against the compiled functions (not used by the loops):
# each row's logsumexp as a running max and rescaled sum, so the logits are read once; the gradient with
# the row and column as two grid axes, so no element's index is divided by the vocabulary size.

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without triton
    triton = None

if triton is not None:
    @triton.jit
    def _lse_picked_kernel(logits, targets, lse, picked, row_stride, V: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        base = logits + row.to(tl.int64) * row_stride
        # Per lane: the running max and the sum of exp(x - max). The max starts finite, so a lane that only
        # ever loads masked (-inf) columns keeps acc 0 instead of computing exp(-inf + inf).
        m = tl.full([BLOCK_V], -1e30, tl.float32)
        acc = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):  # V is a constant of the model: a fixed trip count
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, x)
            acc = acc * tl.exp(m - new_m) + tl.exp(x - new_m)
            m = new_m
        row_max = tl.max(m, 0)
        total = tl.sum(acc * tl.exp(m - row_max), 0)
        tl.store(lse + row, row_max + tl.log(total))
        tl.store(picked + row, tl.load(base + tl.load(targets + row)).to(tl.float32))

    @triton.jit
    def _logits_grad_kernel(logits, lse, targets, scale, out, row_stride, V: tl.constexpr, BLOCK_V: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        offset = row.to(tl.int64) * row_stride + cols
        x = tl.load(logits + offset, mask=cols < V, other=0.0).to(tl.float32)
        one_hot = (cols == tl.load(targets + row)).to(tl.float32)
        g = (one_hot - tl.exp(x - tl.load(lse + row))) * tl.load(scale + row)
        tl.store(out + offset, g.to(out.dtype.element_ty), mask=cols < V)


def triton_lse_picked(logits, targets):
    n, V = logits.shape
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    picked = torch.empty_like(lse)
    _lse_picked_kernel[(n,)](logits, targets, lse, picked, logits.stride(0), V=V, BLOCK_V=2048, num_warps=8)
    return lse, picked


def triton_logits_grad(logits, lse, targets, scale):
    n, V = logits.shape
    out = torch.empty_like(logits)
    _logits_grad_kernel[(n, triton.cdiv(V, 4096))](logits, lse, targets, scale, out, logits.stride(0), V=V,
                                                   BLOCK_V=4096, num_warps=8)
    return out


def chunk_table(args, device, dtype, bandwidth, variants: list[str]) -> None:
    V, C = args.vocab, args.hidden
    n = min(args.chunk or logprobs._default_chunk(V), args.tokens)
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, C, device=device, dtype=dtype, generator=gen)
    w = torch.randn(V, C, device=device, dtype=dtype, generator=gen) / C**0.5
    targets = torch.randint(0, V, (n,), device=device, generator=gen)
    scale = -torch.ones(n, device=device)
    logits = h @ w.T
    lse_ref, picked_ref = logprobs._chunk_logsumexp_picked(logits, targets)
    grad_ref = logprobs._chunk_logits_grad_eager(logits.clone(), lse_ref, targets, scale)  # float32: in place
    item = logits.element_size()
    lse_bytes, grad_bytes = n * V * item, 2 * n * V * item
    print(f"# one chunk: {n} tokens x {C} -> {V}, {str(dtype).removeprefix('torch.')} logits "
          f"({n * V * item / 2**20:.0f} MiB); copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    mm = {"logits h @ w.T": lambda: h @ w.T, "hidden grad g @ w": lambda: logits @ w,
          "weight grad g.T @ h": lambda: logits.T @ h}
    print("  matmuls, ms: " + ", ".join(f"{k} {timed_ms(f, device, args.repeats):.3f}" for k, f in mm.items()))
    print(f"{'variant':10s} {'lse ms':>8s} {'x bound':>8s} {'grad ms':>8s} {'x bound':>8s}  check")
    for variant in variants:
        torch._dynamo.reset()  # each variant compiles afresh (the dynamo cache is per function)
        if variant == "triton":
            lse_fn, grad_fn = triton_lse_picked, triton_logits_grad
        else:
            lse_fn = compiled(logprobs._chunk_logsumexp_picked, variant)
            grad_fn = compiled(logprobs._chunk_logits_grad, variant)
        lse, picked = lse_fn(logits, targets)
        grad = grad_fn(logits, lse, targets, scale)
        # Entries of the gradient are at most 1 in magnitude, rounded to the logits' dtype: within one unit of
        # that rounding at 1 (float32: a few of its units, for exp computed two ways).
        diffs = ((lse - lse_ref).abs().max().item(), (picked - picked_ref).abs().max().item(),
                 (grad.float() - grad_ref.float()).abs().max().item())
        ok = diffs[0] <= 1e-4 and diffs[1] == 0 and diffs[2] <= max(torch.finfo(dtype).eps, 1e-6)
        t_lse = timed_ms(lambda: lse_fn(logits, targets), device, args.repeats)
        t_grad = timed_ms(lambda: grad_fn(logits, lse, targets, scale), device, args.repeats)
        bound = (lse_bytes / bandwidth * 1e3, grad_bytes / bandwidth * 1e3)
        print(f"{variant:10s} {t_lse:8.3f} {t_lse / bound[0]:8.1f} {t_grad:8.3f} {t_grad / bound[1]:8.1f}  "
              f"{'equal to eager' if ok else 'DIFFERS from eager'} (largest |diff| lse {diffs[0]:.1e}, picked "
              f"{diffs[1]:.1e}, grad {diffs[2]:.1e})", flush=True)


def install(variant: str | None) -> None:
    """Point algos/logprobs.py's fused softmax functions at `variant`'s kernels (None: its own, compiled on
    first use), so a whole head runs them."""
    logprobs._compiled.clear()
    torch._dynamo.reset()
    if variant == "triton":
        lse, grad = triton_lse_picked, triton_logits_grad
    elif variant is not None:
        lse, grad = (compiled(logprobs._chunk_logsumexp_picked, variant),
                     compiled(logprobs._chunk_logits_grad, variant))
    if variant is not None:
        logprobs._compiled.update({logprobs._chunk_logsumexp_picked: lse, logprobs._chunk_logits_grad: grad})


def head_table(args, device, dtype, variants: list[str]) -> None:
    V, C, T = args.vocab, args.hidden, args.tokens
    gen = torch.Generator(device=device).manual_seed(1)
    h0 = torch.randn(1, T, C, device=device, generator=gen)
    w0 = torch.randn(V, C, device=device, generator=gen) / C**0.5
    targets = torch.randint(0, V, (1, T), device=device, generator=gen)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def ours(chunk, fused):
        def step():
            h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
            with torch.autocast(**autocast):
                loss = logprobs.linear_cross_entropy_sum(h, w, targets, chunk_tokens=chunk, fused=fused)
            loss.backward()
        return step

    def peer():
        h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
        with torch.autocast(**autocast):
            loss = F.cross_entropy(F.linear(h, w).flatten(0, 1).float(), targets.flatten(), reduction="sum")
        loss.backward()

    default = logprobs._default_chunk(V)
    chunks = sorted({default, *(int(c) for c in args.chunks.split(",") if c)})
    print(f"\n# the whole head, forward + backward: {T} tokens x {C} -> {V}, float32 weights, "
          f"{str(dtype).removeprefix('torch.')} autocast")
    print(f"{'implementation':52s} {'ms':>8s} {'peak GiB':>9s}")
    # (name, step, kernels): the loops' own path at each chunk length, then each other variant's kernels at
    # the default chunk length.
    rows = [(f"linear_cross_entropy_sum, chunk {c}{' (default)' if c == default else ''}", ours(c, None), None)
            for c in chunks]
    rows += [(f"linear_cross_entropy_sum, chunk {default}, {v} kernels", ours(default, True), v)
             for v in variants if v != "dynamic"]
    for name, fn, variant in rows + [("F.linear + F.cross_entropy (float32 logits)", peer, None)]:
        install(variant)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            ms = timed_ms(fn, device, args.repeats)
        except torch.OutOfMemoryError:
            print(f"{name:52s} {'OOM':>8s}")
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"{name:52s} {ms:8.2f} {peak:9.1f}", flush=True)
    install(None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the whole head (table 2): 8 x 2048")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunk", type=int, default=0, help="table 1's chunk length (default: the loops' default)")
    p.add_argument("--chunks", default="1024,4096", help="table 2's chunk lengths besides the default")
    p.add_argument("--variants", default="dynamic,static,rows,tuned")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    variants = args.variants.split(",")
    if triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        variants.append("triton")  # on the CPU only through triton's interpreter (a correctness check)
    chunk_table(args, device, dtype, copy_bandwidth(device), variants)
    head_table(args, device, dtype, variants)


if __name__ == "__main__":
    main()
