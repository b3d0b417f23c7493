"""Process group setup: one process on CPU or GPU, or many under torchrun.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them we run as a single process with no
process group. The backend follows the device: NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun; pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for but torch sees no CUDA GPU")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        # Every rank must be done with collectives before any rank tears its group down: a rank that
        # destroys it early can abort a peer still finishing (gloo: "terminate called ...").
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def catch_stop_signals() -> dict:
    """SIGTERM (preemption, SLURM's time limit) and SIGINT set state["stop"]; the loops then save
    a checkpoint at the end of the step and exit cleanly."""
    state = {"stop": False}

    def handler(signum, frame):
        state["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (a test runner's worker thread)
            pass
    return state
