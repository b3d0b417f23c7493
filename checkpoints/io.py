"""Resumable training checkpoints, shared by every training loop.

One checkpoint is one folder per step, written with torch.distributed.checkpoint (DCP) so
that FSDP2-sharded parameters and optimizer state are saved sharded, by every rank at once, and
can be loaded back at a different world size (saved on 8 GPUs, resumed on 1 CPU process):

    <root>/step-00001000/
        .metadata            DCP's index of every tensor chunk (a pickle: DCP's own format)
        __0_0.distcp ...     DCP data, one file per rank: {"model": ..., "optim": ...}
        rng_rank0.safetensors ...  torch CPU (and CUDA) RNG state of each rank, uint8 tensors
        meta.json            step, resolved config, extra (scheduler, data position); written last

A checkpoint is complete when its folder is named step-XXXXXXXX and holds meta.json. It is
first written to <root>/.tmp-step-XXXXXXXX/ and renamed into place by rank 0 only after every
rank has finished, so killing the job at any moment leaves the previous checkpoint loadable.
Hidden folders (.tmp-*, .old-*) are never loaded and are removed by the next save.

Trust: DCP reads its `.metadata` file and non-tensor entries (optimizer hyperparameters) with
pickle. That is acceptable for checkpoints this trainer wrote itself, and only for those: treat
a checkpoint folder like code. Nothing else here is unpickled; RNG state is safetensors and the
rest is JSON. For sharing weights use checkpoints/hf.py (safetensors).

Usage (train/run.py's resume_or_start does the first part for every loop; the loop decides when
to save and what goes into `extra`):

    if (path := resume_path(out_dir, "auto")) is not None:
        start_step, extra, saved_cfg = load_checkpoint(
            path, model, optimizer, check_config=lambda saved: check_resume_config(saved, cfg_dict))
    ...
    save_checkpoint(out_dir, step, model, optimizer, extra={...}, config=cfg_dict, keep_last=3)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Leftovers of an interrupted save or of a replaced/pruned checkpoint; never loaded.
_STALE_DIR = re.compile(r"^\.(tmp|old)-step-\d+$")

# Tests set this to a function that raises at one of the named stages, to check that a save
# killed halfway leaves the previous checkpoint loadable. Called on every rank.
FAULT_STAGES = ("after_state_write", "after_rng_write", "before_rename", "before_prune")
_fault_hook: Callable[[str], None] | None = None


def _fault(stage: str) -> None:
    if _fault_hook is not None:
        _fault_hook(stage)


# --------------------------------------------------------------------------- distributed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _all_ranks_ok(ok: bool) -> bool:
    """True on every rank iff `ok` is True on every rank.

    Each rank reaches this call whether or not its own part failed, so a failure on one rank
    turns into an exception on all of them instead of the others hanging in a later collective.
    """
    if not _distributed():
        return ok
    # NCCL only reduces CUDA tensors; gloo (and a "cpu:gloo,cuda:nccl" group) takes CPU ones.
    on_cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _dcp(save_or_load: Callable, state: dict[str, Any], path: Path) -> None:
    """dcp.save or dcp.load: collectively on every rank, or alone when there is no process group."""
    if _distributed():
        save_or_load(state, checkpoint_id=path)
        return
    # DCP runs as a single rank with no_dist=True, and warns that it does on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save_or_load(state, checkpoint_id=path, no_dist=True)


# --------------------------------------------------------------------------- state dicts


def _options(trainable_only: bool) -> StateDictOptions:
    # ignore_frozen_params drops every parameter with requires_grad=False (the LoRA base) from
    # the model state dict. Loading such a partial dict into the model needs strict=False; DCP
    # itself still raises if the checkpoint lacks a key we ask for, so nothing goes missing.
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _get_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool) -> dict[str, Any]:
    """{"model": ..., "optim": ...} whose tensors are the live (possibly sharded DTensor) ones."""
    options = _options(trainable_only)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options)}
    # On an optimizer that has not stepped yet, get_state_dict first creates its state (a step
    # with lr=0, leaving Adam's step count at 1), so a fresh optimizer has tensors for DCP to
    # load into. The same happens when saving before the first step: save after it.
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optim": optim_sd}


# --------------------------------------------------------------------------- RNG


def _save_rng(ckpt_dir: Path, rank: int) -> None:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device
    path = ckpt_dir / f"rng_rank{rank}.safetensors"
    save_file(state, str(path))
    _fsync_file(path)


def _load_rng(ckpt_dir: Path, rank: int, step: int) -> None:
    """Restore this rank's RNG state; reseed from (step, rank) when the file is missing.

    Resuming at the same or a smaller world size finds every rank's file, so rank r continues
    rank r's random stream exactly. At a larger world size the new ranks have no saved stream;
    they get a deterministic seed so that a repeated resume still reproduces itself.
    """
    path = ckpt_dir / f"rng_rank{rank}.safetensors"
    if not path.is_file():
        warnings.warn(f"{path} not found (checkpoint saved at a smaller world size): reseeding rank {rank} from step {step}")
        torch.manual_seed(step * 100_003 + rank)  # also seeds every CUDA device
        return
    state = load_file(str(path))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding the new entry is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint folder so that no half-deleted copy can look complete.

    Renaming first is atomic: a kill during rmtree leaves a hidden .old-* folder, which is
    never loaded and is removed by the next save.
    """
    hidden = path.with_name(f".old-{path.name}")
    os.replace(path, hidden)
    shutil.rmtree(hidden)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (step-XXXXXXXX/ with meta.json) under root, or None."""
    found = _complete_checkpoints(Path(root))
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    ckpt_dir_root: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict,
    config: dict,
    keep_last: int,
    trainable_only: bool = False,
) -> Path:
    """Write <root>/step-XXXXXXXX/ atomically; call on every rank. Returns the folder.

    root must be one folder that every rank sees (a shared filesystem across nodes).

    extra and config must be JSON-able (plain dicts, lists, numbers, strings). keep_last > 0
    deletes all but the newest keep_last complete checkpoints afterwards (never the new one);
    keep_last <= 0 keeps all. trainable_only saves only parameters with requires_grad (LoRA).

    An existing checkpoint of the same step is replaced only after the new one is complete: it
    is renamed to .old-step-XXXXXXXX, the new one renamed into place, then the old one deleted.
    (A kill between those two renames leaves no step-XXXXXXXX for that step; an older
    checkpoint, if kept, is then the latest.) Any failure removes the temporary folder and
    raises a RuntimeError naming the checkpoint.
    """
    root = Path(ckpt_dir_root)
    final = _step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    rank = _rank()
    # Serialise first: a value JSON cannot hold fails here, on every rank, before any writing.
    meta_text = json.dumps(
        {"step": step, "world_size": _world_size(), "trainable_only": trainable_only, "config": config, "extra": extra},
        indent=2,
    )
    state = _get_state(model, optimizer, trainable_only)

    # Each phase records its exception instead of raising at once: every rank must reach
    # _all_ranks_ok, or the others would wait forever in the next collective.
    error: Exception | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for p in root.iterdir():  # leftovers of interrupted saves, this step's included
                if _STALE_DIR.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
            tmp.mkdir()  # raises if a stale tmp/ of this step could not be removed
        except Exception as e:
            error = e
    if not _all_ranks_ok(error is None):
        raise RuntimeError(f"saving checkpoint {final} failed preparing {tmp}") from error

    # Every rank writes its shards and its RNG state into tmp/.
    try:
        _dcp(dcp.save, state, tmp)
        _fault("after_state_write")
        _save_rng(tmp, rank)
        _fault("after_rng_write")
    except Exception as e:
        error = e
    if not _all_ranks_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"saving checkpoint {final} failed" + ("" if error else " on another rank")) from error

    # Rank 0 commits: meta.json last, then the rename that makes the checkpoint visible.
    old = final.with_name(f".old-{final.name}")
    renamed = False
    if rank == 0:
        try:
            meta = tmp / "meta.json"
            meta.write_text(meta_text)
            _fsync_file(meta)
            _fsync_dir(tmp)
            _fault("before_rename")
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            renamed = True
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
            _fault("before_prune")
            if keep_last > 0:
                keep = {p for _, p in _complete_checkpoints(root)[-keep_last:]} | {final}
                for _, p in _complete_checkpoints(root):
                    if p not in keep:
                        _remove_dir(p)
        except Exception as e:
            error = e
            if not renamed:
                with contextlib.suppress(OSError):  # best effort: put a replaced checkpoint back
                    if old.exists() and not final.exists():
                        os.replace(old, final)
                shutil.rmtree(tmp, ignore_errors=True)
    if not _all_ranks_ok(error is None):
        if renamed:
            raise RuntimeError(f"checkpoint {final} was saved, but the cleanup after it failed") from error
        raise RuntimeError(f"saving checkpoint {final} failed" + ("" if error else " on rank 0")) from error
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainable_only: bool = False,
    check_config: Callable[[dict], None] | None = None,
) -> tuple[int, dict, dict]:
    """Restore model, optimizer (unless None) and this rank's RNG from a checkpoint folder.

    Call on every rank, after the model is built, frozen and sharded exactly as for training
    (any world size) and the optimizer is created. `check_config(saved_config)` runs before any
    tensor is read (it raises to refuse the resume). Returns (step, extra, config).
    """
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if check_config is not None:
        check_config(meta["config"])
    if meta["trainable_only"] and not trainable_only:
        raise ValueError(f"{path} holds only the trainable parameters; load it with trainable_only=True")

    # DCP reads into the tensors of `state` in place, resharding to this world size.
    state = _get_state(model, optimizer, trainable_only)
    _dcp(dcp.load, state, path)
    options = _options(trainable_only)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        # The optimizer's state is keyed by parameter name in `state`; this maps it back.
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    _load_rng(path, _rank(), meta["step"])
    return meta["step"], meta["extra"], meta["config"]


# --------------------------------------------------------------------------- config check


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_config(saved_config: dict, current_config: dict, ignore: Iterable[str] = ("resume",)) -> None:
    """Raise ValueError naming every dotted key whose value differs between the two configs.

    A key in `ignore` also ignores everything below it ("data" ignores "data.path"). Loops
    pass the keys a resumed run may change, e.g. the total number of steps.
    """
    # The saved config went through JSON (tuples became lists); put the current one through too.
    saved = _flatten(saved_config)
    current = _flatten(json.loads(json.dumps(current_config)))
    ignore = tuple(ignore)
    missing = "<absent>"
    diffs = []
    for key in sorted(saved.keys() | current.keys()):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            diffs.append(f"  {key}: checkpoint {a!r}, current {b!r}")
    if diffs:
        raise ValueError(
            "the checkpoint was written with a different config (use a new out_dir, or make the "
            "config match):\n" + "\n".join(diffs)
        )


def resume_path(out_dir: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint a run continues from: "auto" is the newest complete one in out_dir (None on
    a fresh run), "none" is None, anything else is a checkpoint folder, which must exist."""
    if resume == "auto":
        return latest_checkpoint(out_dir)
    if resume == "none":
        return None
    path = Path(resume)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no meta.json)")
    return path
