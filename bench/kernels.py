"""Where a step's GPU time goes: the profile tables the bench scripts print with `--profile`.

    print_gpu_time(name, prof, steps, wall_ms)   # after `with torch.profiler.profile(...) as prof:`
    StepProfiler(name, start=4, steps=3)         # inside a training loop: .step() once per step
    profile_steps(train.dpo, name, start=4)      # the same, inside a loop module's own main()

The kernels are grouped into the parts bench/budget.py counts (matmuls, attention, fused elementwise
work, the optimizer); whatever the kernels leave of the wall time of a step is time the GPU waited for
the host (launches, synchronisations, Python). With CPU activity recorded too, the host operations
with the most time of their own follow, which is where such waiting comes from.
"""

from __future__ import annotations

import sys
import time

import torch

# Kernel names to parts, first match wins (cuBLAS's Hopper kernels are nvjet_* or sm90_xmma_*;
# inductor's Triton matmul templates are triton_tem_*mm*, its FlexAttention kernels
# triton_tem_fused_flex_attention*; the rest of inductor's Triton kernels are the fused elementwise
# work and reductions).
KERNEL_PARTS = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "splitkreduce", "triton_tem")),
    ("optimizer + clipping (multi-tensor)", ("multi_tensor", "adam")),
    ("compiled elementwise + reductions (Triton)", ("triton_",)),
    ("copies and fills", ("memcpy", "memset", "copy_", "fill")),
]


def kernel_part(name: str) -> str:
    lower = name.lower()
    return next((part for part, keys in KERNEL_PARTS if any(k in lower for k in keys)), "other (eager ATen)")


def print_gpu_time(name: str, prof, steps: int, wall_ms: float, top: int = 15, cpu_top: int = 12) -> None:
    """GPU time by part and the longest kernels, per step, beside the wall time of a step; then, when
    the profile has CPU events, the host operations with the most self time."""
    averages = prof.key_averages()
    events = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    parts: dict[str, float] = {}
    for e in events:
        parts[kernel_part(e.key)] = parts.get(kernel_part(e.key), 0.0) + e.self_device_time_total / 1e3 / steps
    busy = sum(parts.values())
    print(f"# {name}: GPU time by part, ms a step (a step takes {wall_ms:.1f} ms; kernels {busy:.1f})")
    for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"#   {part:44s} {ms:8.1f} {ms / wall_ms:6.1%}")
    print(f"#   {'no kernel running (launch gaps, syncs)':44s} {wall_ms - busy:8.1f} {(wall_ms - busy) / wall_ms:6.1%}")
    print(f"# {name}: the {top} kernels that take longest, ms a step")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"#   {e.self_device_time_total / 1e3 / steps:8.2f} {e.count // steps:5d}x  {kernel_part(e.key)[:9]:9s} "
              f"{e.key[:80]}")
    host = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0]
    if cpu_top and host:
        print(f"# {name}: the {cpu_top} host operations with the most self time, ms a step")
        for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:cpu_top]:
            print(f"#   {e.self_cpu_time_total / 1e3 / steps:8.2f} {e.count // steps:5d}x  {e.key[:90]}")
    sys.stdout.flush()


class StepProfiler:
    """Profiles `steps` consecutive steps of a loop that calls .step() once at the end of each step,
    starting after `start` steps (past compilation), and prints print_gpu_time's tables. The wall time
    is the profiled window's, so the profiler's own overhead is in it: compare it with the unprofiled
    s/step of the same run."""

    def __init__(self, name: str, start: int = 4, steps: int = 3, cpu: bool = True):
        self.name, self.start, self.steps, self.cpu = name, start, steps, cpu
        self.done = 0
        self.prof = None
        self.t0 = 0.0

    def step(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.done += 1
        cuda = torch.cuda.is_available()
        if self.done == self.start:
            if cuda:
                torch.cuda.synchronize()
            activities = [ProfilerActivity.CUDA] if cuda else []
            if self.cpu or not cuda:
                activities.append(ProfilerActivity.CPU)
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and self.done == self.start + self.steps:
            if cuda:
                torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - self.t0) * 1e3 / self.steps
            self.prof.__exit__(None, None, None)
            print_gpu_time(self.name, self.prof, self.steps, wall_ms)
            self.prof = None


def profile_steps(loop_module, name: str, start: int, steps: int = 3) -> None:
    """Make a loop module's Throughput (its .add runs once at the end of every step) profile `steps`
    steps after `start` with a StepProfiler, so the loop's own main() is profiled unchanged."""
    profiler = StepProfiler(name, start, steps)

    class ProfiledThroughput(loop_module.Throughput):
        def add(self, tokens: int) -> None:
            super().add(tokens)
            profiler.step()

    loop_module.Throughput = ProfiledThroughput
