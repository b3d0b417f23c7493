"""Resumable training checkpoints, shared by every training loop.

One checkpoint is one folder per step, written with torch.distributed.checkpoint (DCP) so
that FSDP2-sharded parameters and optimizer state are saved sharded, by every rank at once, and
can be loaded back at a different world size (saved on 8 GPUs, resumed on 1 CPU process):

    <root>/step-00001000/
        .metadata            DCP's index of every tensor chunk (a pickle: DCP's own format)
        __0_0.distcp ...     DCP data, one file per rank: {"model": ..., "optim": ...}
        rng_rank0.safetensors ...  torch CPU (and CUDA) RNG state of each rank, uint8 tensors
        meta.json            step, resolved config, extra (scheduler, data position), and the size
                             and CRC-32 of every other file; written last

A checkpoint is complete when its folder is named step-XXXXXXXX and holds meta.json. It is
first written to <root>/.tmp-step-XXXXXXXX/ and renamed into place by rank 0 only after every
rank has finished, so killing the job at any moment leaves the previous checkpoint loadable.
Hidden folders (.tmp-*, .old-*) are never loaded and are removed by the next save. A save that
fails (a full disk included: "no space left writing <checkpoint>") removes its temporary folder.

Damage: before a checkpoint is loaded, its meta.json must parse and every file it lists must be
there with its recorded size and CRC-32 (the ranks share the reading), so a file truncated or
missing after the save is named before any tensor is read (`verify_checkpoint`). What resume does
with a damaged checkpoint (`resume_path`), chosen as a database treats a torn page: with
checkpoint.resume "auto", the newest checkpoint that passes is resumed, with a warning naming each
newer damaged one (left on disk untouched; a later save of the same step replaces it). A run is
never restarted from scratch because of damage: when every checkpoint is damaged, it stops with an
error naming them. A checkpoint named by path (checkpoint.resume: <folder>) is loaded or refused,
never swapped for another.

Trust: DCP stores its `.metadata` and non-tensor entries (optimizer hyperparameters) as pickles.
Both are read here through restricted unpicklers that admit only DCP's metadata classes, torch.Size
and dtypes, and plain data (as torch.load(weights_only=True) does for tensors), so a checkpoint
folder from elsewhere cannot run code when it is resumed or converted: a pickle naming anything
else is refused with an error naming the checkpoint. RNG state is safetensors, the rest JSON.

Usage (train/run.py's resume_or_start does the first part for every loop; the loop decides when
to save and what goes into `extra`):

    if (path := resume_path(out_dir, "auto")) is not None:   # verified, or an older one with a warning
        start_step, extra, saved_cfg = load_checkpoint(
            path, model, optimizer, check_config=lambda saved: check_resume_config(saved, cfg_dict))
    ...
    save_checkpoint(out_dir, step, model, optimizer, extra={...}, config=cfg_dict, keep_last=3)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import pickle
import re
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.futures import Future

from model.files import read_json

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Leftovers of an interrupted save or of a replaced/pruned checkpoint; never loaded.
_STALE_DIR = re.compile(r"^\.(tmp|old)-step-\d+$")
_META_KEYS = ("step", "trainable_only", "config", "extra")

# Tests set this to a function that raises at one of the named stages, to check that a save
# killed halfway leaves the previous checkpoint loadable. Called on every rank.
FAULT_STAGES = ("after_state_write", "after_rng_write", "before_rename", "before_prune")
_fault_hook: Callable[[str], None] | None = None


def _fault(stage: str) -> None:
    if _fault_hook is not None:
        _fault_hook(stage)


class DamagedCheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded as written: a file missing, truncated or changed since
    the save, a meta.json that does not parse, or a pickle that names something DCP never stores."""


# --------------------------------------------------------------------------- distributed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _all_reduce(values: list[int], op=None) -> list[int]:
    """Reduce (MAX unless told) small integers over every rank; each rank must reach the call.

    Each rank reaches these calls whether or not its own part failed, so a failure on one rank
    turns into an exception on all of them instead of the others hanging in a later collective.
    """
    if not _distributed():
        return list(values)
    # NCCL only reduces CUDA tensors; gloo (and a "cpu:gloo,cuda:nccl" group) takes CPU ones.
    on_cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op is None else op)
    return t.tolist()


def _dcp(save_or_load: Callable, state: dict[str, Any], path: Path, **kwargs):
    """dcp.save or dcp.load: collectively on every rank, or alone when there is no process group."""
    if _distributed():
        return save_or_load(state, checkpoint_id=path, **kwargs)
    # DCP runs as a single rank with no_dist=True, and warns that it does on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return save_or_load(state, checkpoint_id=path, no_dist=True, **kwargs)


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


def _state_bytes(state) -> int:
    """Bytes of this rank's tensors in a state dict (its local shards)."""
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


# --------------------------------------------------------------------------- no code from a checkpoint

# Everything DCP's Metadata pickles (torch/distributed/checkpoint/metadata.py: the dataclasses and the
# memory-format enum, filesystem.py's _StorageInfo), the path it records the checkpoint under, and the
# torch types inside TensorProperties. Each is a plain data class: calling one builds data, nothing else.
_DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *((module, cls) for module in ("pathlib", "pathlib._local")
      for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch.layout pickles: a name looked up in torch
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` admitting only _DCP_METADATA_GLOBALS and torch dtypes, as
    torch.load(weights_only=True) admits only what state dicts hold: a pickle that asks for any
    other global (os.system, builtins.eval, ...) stops here, before the global is even imported."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def _read_dcp_metadata(path: Path, name: str = ".metadata"):
    file = path / name
    try:
        with open(file, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {name} is missing") from None
    except pickle.UnpicklingError as e:
        raise DamagedCheckpointError(f"checkpoint {path}: refusing to unpickle {name}: {e}. It was not written "
                                     "by DCP (a crafted or corrupt file); nothing in it was run") from None
    except Exception as e:  # truncated or garbled: EOFError, ValueError, ...
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {name} cannot be read "
                                     f"(truncated or corrupt: {_one_line(e)})") from None


class _SafeReader(FileSystemReader):
    """DCP's file reader with the `.metadata` pickle read by _MetadataUnpickler, and a file that
    cannot be read named with its checkpoint (torch's own message names neither)."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        metadata = _read_dcp_metadata(Path(self.path), ".metadata" if rank is None else f"__{rank}.metadata")
        # What FileSystemReader.read_metadata also does after unpickling.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():  # one file at a time, so a failure names its file
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except DamagedCheckpointError:
                raise
            except Exception as e:
                raise DamagedCheckpointError(f"checkpoint {self.path} is damaged: {name} cannot be read "
                                             f"(truncated or corrupt: {_one_line(e)})") from e
        done: Future = Future()
        done.set_result(None)
        return done


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with its non-tensor entries (optimizer hyperparameters: floats, bools, tuples)
    unpickled only after torch.load(weights_only=True) has accepted them."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # DefaultLoadPlanner.load_bytes unpickles with weights_only=False. The same bytes are first read
        # by the restricted unpickler: if it accepts them, every global they name is plain data, and the
        # full read that follows can do nothing else.
        try:
            torch.load(value, weights_only=True)
        except Exception as e:
            lines = str(e).splitlines()
            reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(e).__name__)
            raise DamagedCheckpointError(f"refusing to unpickle the entry {read_item.dest_index.fqn!r} ({reason}); "
                                         "nothing in it was run") from None
        value.seek(0)
        super().load_bytes(read_item, value)


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
    try:
        state = load_file(str(path))
    except Exception as e:
        raise DamagedCheckpointError(f"checkpoint {ckpt_dir} is damaged: {path.name} cannot be read ({e})") from None
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


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _my_share(ckpt_dir: Path, names: list[str]) -> list[int]:
    """(bytes, crc32) of this rank's share of the files (rank r reads files r, r + world, ...), zeros for
    the others' share: flattened, so that one collective (`_all_reduce`, MAX) completes the table."""
    rank, world = _rank(), _world_size()
    table = [0] * (2 * len(names))
    for i in range(rank, len(names), world):
        path = ckpt_dir / names[i]
        table[2 * i], table[2 * i + 1] = path.stat().st_size, _crc32(path)
    return table


def _read_meta(path: Path) -> dict:
    """A checkpoint's meta.json, or DamagedCheckpointError naming it (empty, corrupt, keys missing)."""
    meta_file = path / "meta.json"
    try:
        meta = read_json(meta_file, keys=_META_KEYS)
    except (ValueError, OSError) as e:
        hint = ""
        with contextlib.suppress(Exception):
            if "shards" in read_json(meta_file):
                hint = " (this is token data made by train/corpus.py, not a training checkpoint)"
        raise DamagedCheckpointError(f"checkpoint {path} cannot be loaded: {e}{hint}") from None
    files = meta.get("files", {})
    well_formed = (isinstance(meta["step"], int) and isinstance(meta["extra"], dict)
                   and isinstance(meta["config"], dict) and isinstance(files, dict)
                   and all(isinstance(name, str) and "/" not in name and "\\" not in name and isinstance(f, dict)
                           and isinstance(f.get("bytes"), int) and isinstance(f.get("crc32"), int)
                           for name, f in files.items()))
    if not well_formed:
        raise DamagedCheckpointError(f"checkpoint {path} cannot be loaded: {meta_file} has a malformed step, "
                                     "extra, config or file list")
    return meta


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint folder before anything is loaded from it; returns its meta.json.

    meta.json must parse and hold the step, config and extra; DCP's `.metadata` must unpickle with the
    restricted unpickler; every file meta.json lists must have its recorded size (checked by every rank)
    and CRC-32 (rank r reads files r, r + world, ...); only a missing RNG file is allowed (`_load_rng`
    reseeds that rank). Raises DamagedCheckpointError naming the checkpoint and the file, on every rank.
    Checkpoints saved before meta.json listed its files get the first two checks only. Call on every rank.
    """
    path = Path(path)
    error = None
    try:
        meta = _read_meta(path)
        _read_dcp_metadata(path)
    except DamagedCheckpointError as e:
        error, meta = e, {}
    if _all_reduce([error is not None])[0]:  # the same files on every rank: normally all fail alike
        raise error or DamagedCheckpointError(f"checkpoint {path} is damaged (another rank could not read its "
                                              "meta.json or .metadata)")

    files = meta.get("files") or {}
    names = sorted(files)
    rank, world = _rank(), _world_size()
    bad, why = len(names), ""
    for i, name in enumerate(names):
        file, want = path / name, files[name]
        if not file.is_file():
            if name.startswith("rng_rank"):  # _load_rng reseeds that rank, with a warning
                continue
            bad, why = i, "is missing"
        elif file.stat().st_size != want["bytes"]:
            bad, why = i, f"has {file.stat().st_size} bytes, {want['bytes']} were written (truncated or replaced)"
        elif i % world == rank and _crc32(file) != want["crc32"]:
            bad, why = i, "does not match the CRC-32 recorded when it was written (changed since)"
        if bad < len(names):
            break
    first_bad = -_all_reduce([-bad])[0]  # MIN over ranks: the first damaged file any rank found
    if first_bad < len(names):
        if first_bad != bad:  # found by another rank's checksum
            why = "does not match the CRC-32 recorded when it was written (changed since)"
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {names[first_bad]} {why}")
    return meta


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
    """The newest complete checkpoint (step-XXXXXXXX/ with meta.json) under root, or None. It may still
    be damaged: `resume_path` picks the newest that verifies."""
    found = _complete_checkpoints(Path(root))
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- save / load


def _interrupt_in(error: BaseException | None) -> BaseException | None:
    """A KeyboardInterrupt or SystemExit that `error` is, or that DCP wrapped into its CheckpointException
    (which derives from BaseException, not Exception, and carries each rank's exception)."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return error
    for inner, _ in getattr(error, "failures", {}).values():
        if isinstance(inner, (KeyboardInterrupt, SystemExit)):
            return inner
    return None


def _causes(error: BaseException | None) -> list[BaseException]:
    """The exception, what DCP wrapped into it on each rank, and their causes and contexts."""
    seen, todo = [], [error]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, *(inner for inner, _ in getattr(e, "failures", {}).values())]
    return seen


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return type(e).__name__ + (f": {text.splitlines()[0]}" if text else "")


def _summary(error: BaseException | None) -> str:
    """One line for the message: the innermost exception DCP wrapped, not its whole per-rank traceback."""
    inner = [e for e in _causes(error) if not hasattr(e, "failures")]
    e = inner[0] if inner else error
    return "" if e is None else f": {_one_line(e)}"


def _out_of_space(error: BaseException | None, where: Path, needed: int) -> bool:
    """Did this failure come from a full disk? ENOSPC/EDQUOT anywhere in the chain, or (torch's zip writer
    drops the errno: "enforce fail at inline_container.cc") less room left where we write than we needed."""
    if error is None:
        return False
    for e in _causes(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            return True
    try:
        return shutil.disk_usage(where).free < needed
    except OSError:
        return False


def _agree(error: BaseException | None, where: Path, needed: int) -> int:
    """Every rank's worst outcome of a phase: 0 fine, 1 failed, 2 failed for lack of disk space."""
    code = 0 if error is None else 2 if _out_of_space(error, where, needed) else 1
    return _all_reduce([code])[0]


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _save_error(final: Path, tmp: Path, error: BaseException | None, outcome: int, where: str,
                needed: int = 0) -> BaseException:
    """What a failed save raises, once its temporary folder is gone: an interrupt as itself, else a
    RuntimeError naming the checkpoint (and the full disk, when that was it)."""
    if (interrupt := _interrupt_in(error)) is not None:
        return interrupt
    if outcome == 2:
        free = shutil.disk_usage(final.parent).free if final.parent.exists() else 0
        message = (f"no space left writing checkpoint {final} (about {_size(needed)} on this rank; "
                   f"{_size(free)} free with {tmp.name} removed); the earlier checkpoints are untouched")
    else:
        message = f"saving checkpoint {final} failed{where}{_summary(error) if error else ' on another rank'}"
    exc = RuntimeError(message)
    exc.__cause__ = error
    return exc


def _abort_if(outcome: int, final: Path, tmp: Path, error: BaseException | None, needed: int) -> None:
    """After a phase every rank agreed had failed: remove the temporary folder (rank 0) and raise."""
    if outcome:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(final, tmp, error, outcome, "", needed)


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
    checkpoint, if kept, is then the latest.) Any failure, an interrupt or DCP's CheckpointException
    included, removes the temporary folder and raises a RuntimeError naming the checkpoint ("no space
    left writing ..." for a full disk); a KeyboardInterrupt or SystemExit is raised again as itself.
    """
    root = Path(ckpt_dir_root)
    final = _step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    rank = _rank()
    # Serialise first: a value JSON cannot hold fails here, on every rank, before any writing.
    meta = {"step": step, "world_size": _world_size(), "trainable_only": trainable_only, "config": config,
            "extra": extra}
    json.dumps(meta)
    state = _get_state(model, optimizer, trainable_only)
    needed = _state_bytes(state)

    # Each phase records its exception instead of raising at once: every rank must reach _agree, or
    # the others would wait forever in the next collective. BaseException: DCP's CheckpointException
    # is not an Exception, and an interrupt must not leave a half-written folder behind either.
    error: BaseException | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for p in root.iterdir():  # leftovers of interrupted saves, this step's included
                if _STALE_DIR.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
            tmp.mkdir()  # raises if a stale tmp/ of this step could not be removed
        except BaseException as e:
            error = e
    if outcome := _agree(error, root if root.exists() else root.parent, needed):
        raise _save_error(final, tmp, error, outcome, f" preparing {tmp}", needed)

    # Every rank writes its shards and its RNG state into tmp/.
    names, share = [], []
    try:
        written = _dcp(dcp.save, state, tmp)  # DCP's metadata, on every rank: which files hold what
        _fault("after_state_write")
        _save_rng(tmp, rank)
        _fault("after_rng_write")
        if written.storage_data:
            data_files = {info.relative_path for info in written.storage_data.values()}
        else:  # torch 2.11's dcp.save returns no storage_data; once it returns, every rank's shard is written
            data_files = {p.name for p in tmp.iterdir() if p.suffix == ".distcp"}
        names = sorted(data_files | {".metadata"} | {f"rng_rank{r}.safetensors" for r in range(_world_size())})
    except BaseException as e:
        error = e
    _abort_if(_agree(error, tmp, needed), final, tmp, error, needed)
    # Once all have, each reads back its share of the files for the sizes and CRC-32s meta.json lists.
    try:
        share = _my_share(tmp, names)
    except BaseException as e:
        error = e
    _abort_if(_agree(error, tmp, needed), final, tmp, error, needed)
    table = _all_reduce(share)  # the other ranks' entries are 0: MAX fills them in
    meta["files"] = {name: {"bytes": table[2 * i], "crc32": table[2 * i + 1]} for i, name in enumerate(names)}

    # Rank 0 commits: meta.json last, then the rename that makes the checkpoint visible.
    old = final.with_name(f".old-{final.name}")
    renamed = False
    if rank == 0:
        try:
            meta_file = tmp / "meta.json"
            meta_file.write_text(json.dumps(meta, indent=2))
            _fsync_file(meta_file)
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
        except BaseException as e:
            error = e
            if not renamed:
                with contextlib.suppress(OSError):  # best effort: put a replaced checkpoint back
                    if old.exists() and not final.exists():
                        os.replace(old, final)
                shutil.rmtree(tmp, ignore_errors=True)
    meta_bytes = 0 if renamed else len(json.dumps(meta, indent=2))
    if outcome := _agree(error, root, meta_bytes):
        if renamed and _interrupt_in(error) is None:
            exc = RuntimeError(f"checkpoint {final} was saved, but the cleanup after it failed{_summary(error)}")
            raise exc from error
        raise _save_error(final, tmp, error, outcome, "", meta_bytes)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainable_only: bool = False,
    check_config: Callable[[dict], None] | None = None,
    verify: bool = True,
) -> tuple[int, dict, dict]:
    """Restore model, optimizer (unless None) and this rank's RNG from a checkpoint folder.

    Call on every rank, after the model is built, frozen and sharded exactly as for training
    (any world size) and the optimizer is created. `check_config(saved_config)` runs before any
    tensor is read (it raises to refuse the resume). The files are verified first
    (`verify_checkpoint`; verify=False when the caller just did, as `resume_path` does); a damaged
    checkpoint raises DamagedCheckpointError naming it and the file. Returns (step, extra, config).
    """
    path = Path(path)
    if verify:
        meta = verify_checkpoint(path)
    else:
        meta = _read_meta(path)
        _read_dcp_metadata(path)  # refused here, before DCP (which would log it and try other files)
    if check_config is not None:
        check_config(meta["config"])
    if meta["trainable_only"] and not trainable_only:
        raise ValueError(f"{path} holds only the trainable parameters; load it with trainable_only=True")

    # DCP reads into the tensors of `state` in place, resharding to this world size.
    state = _get_state(model, optimizer, trainable_only)
    try:
        _dcp(dcp.load, state, path, storage_reader=_SafeReader(path), planner=_SafePlanner())
    except BaseException as e:  # DCP wraps each rank's exception into a CheckpointException (a BaseException)
        if (interrupt := _interrupt_in(e)) is not None:
            raise interrupt from None
        damaged = [c for c in _causes(e) if isinstance(c, DamagedCheckpointError)]
        if damaged:
            message = str(damaged[0])
            raise DamagedCheckpointError(message if str(path) in message else f"checkpoint {path}: {message}") from e
        raise RuntimeError(f"loading checkpoint {path} failed{_summary(e)}") from e
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
    """The checkpoint a run continues from, verified (`verify_checkpoint`); call on every rank.

    "auto": the newest complete checkpoint in out_dir that verifies; each newer damaged one is named in
    a warning and left as it is. None on a fresh run; when checkpoints exist but every one is damaged,
    DamagedCheckpointError naming each (a run never silently starts over). "none": None. Anything else is
    a checkpoint folder, which must exist and verify.
    """
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "meta.json").exists():
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no meta.json)")
        verify_checkpoint(path)
        return path
    damaged = []
    for _, path in reversed(_complete_checkpoints(Path(out_dir))):
        try:
            verify_checkpoint(path)
        except DamagedCheckpointError as e:
            damaged.append(str(e))
            continue
        if damaged and _rank() == 0:
            warnings.warn("\n".join(damaged) + f"\nresuming from the newest checkpoint that loads, {path}",
                          stacklevel=2)
        return path
    if damaged:
        raise DamagedCheckpointError(
            f"no checkpoint in {out_dir} can be loaded:\n  " + "\n  ".join(damaged) + "\nTo continue, copy an intact "
            "checkpoint folder back and name it with --checkpoint.resume <folder>; to start over, use a new "
            "out_dir (these folders are left as they are)")
    return None


def saved_config(out_dir: str | os.PathLike, resume: str) -> dict | None:
    """The config saved with the checkpoint `resume_path` would pick, read from its meta.json alone (a
    check that costs nothing before a run writes or prepares anything); None on a fresh run, or when no
    meta.json reads (resume_path then says why)."""
    if resume == "none":
        return None
    if resume != "auto":
        return _read_meta(Path(resume))["config"] if (Path(resume) / "meta.json").exists() else None
    for _, path in reversed(_complete_checkpoints(Path(out_dir))):
        with contextlib.suppress(DamagedCheckpointError):
            return _read_meta(path)["config"]
    return None
