"""Metrics: a console line per logged step, metrics.jsonl in the run folder, optional trackers.

Only rank 0 writes. The loop computes the numbers; this file formats and stores them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from train.config import LogConfig

# Dense bf16 peak of the GPUs we measure on, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsLogger:
    def __init__(self, out_dir: str | Path, cfg: LogConfig, enabled: bool, run_config: dict | None = None):
        self.enabled = enabled
        self.cfg = cfg
        self.jsonl = None
        self.tb = self.wandb = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("log.tensorboard is set but tensorboard is not installed (pip install tensorboard)")
            self.tb = SummaryWriter(str(out_dir / "tb"))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("log.wandb_project is set but wandb is not installed (pip install wandb)")
            self.wandb = wandb.init(project=cfg.wandb_project, config=run_config, dir=str(out_dir))

    def log(self, step: int, metrics: dict, total_steps: int | None = None, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": round(time.time(), 3), **_plain(metrics)}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in record.items() if k != "step"}, step=step)
        print(format_line(step, total_steps, record), file=sys.stderr, flush=True)

    def print(self, *args) -> None:
        if self.enabled:
            print(*args, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def seconds_since(t0: float, device: torch.device) -> float:
    """Seconds since t0 (time.perf_counter), once the device has run the work queued so far: a phase's
    time must not leave its GPU work to be counted in the next phase's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def format_line(step: int, total: int | None, r: dict) -> str:
    width = len(str(total)) if total else 1
    parts = [f"{r.get('split', 'train'):5s} step {step:>{width}}" + (f"/{total}" if total else "")]
    if "loss" in r:
        parts.append(f"loss {r['loss']:.4f}")
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    if "grad_norm" in r:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    if "rewards/accuracies" in r:  # preference runs: how often chosen beats rejected, and by how much
        parts.append(f"acc {r['rewards/accuracies']:.2f} margin {r['rewards/margins']:.3f}")
    elif "rewards/chosen" in r:  # KTO: unpaired, so the gap between the two classes' mean rewards
        parts.append(f"margin {r['rewards/chosen'] - r['rewards/rejected']:.3f}")
    if "reward" in r:  # RL runs: the mean reward, the share answered right, the completions' mean length
        parts.append(f"reward {r['reward']:+.3f}" + (f" acc {r['accuracy']:.2f}" if "accuracy" in r else "") +
                     (f" len {r['completion_len']:.0f}" if "completion_len" in r else ""))
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("peak_mem_gib") is not None:
        parts.append(f"mem {r['peak_mem_gib']:.1f} GiB")
    if r.get("eta_s") is not None:
        parts.append(f"ETA {_duration(r['eta_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _plain(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, float):
            v = round(v, 6)
        out[k] = v
    return out


class Throughput:
    """Tokens/s, MFU and ETA over the steps since the last report."""

    def __init__(self, flops_per_token: float, device: torch.device, world_size: int, tokens_seen: int = 0):
        self.flops_per_token = flops_per_token
        self.tokens_seen = tokens_seen  # over the whole run, resumed runs included: the x axis of loss curves
        self.peak = peak_flops(device)
        self.device = device
        self.world_size = world_size
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.tokens_seen += tokens

    def report(self, steps_left: int, steps_done: int) -> dict:
        """Figures since the previous report (tokens counted over all ranks)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = max(now - self.t0, 1e-9)
        tps = self.tokens / elapsed
        out = {
            "tokens": self.tokens_seen,
            "tokens_per_s": tps,
            "eta_s": elapsed / max(steps_done, 1) * steps_left,
            "mfu": tps * self.flops_per_token / (self.peak * self.world_size) if self.peak else None,
        }
        if self.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.t0, self.tokens = now, 0
        return out
