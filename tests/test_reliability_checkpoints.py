"""Checkpoints under faults (issue 12): damage is named by checkpoint and file before any tensor is read,
resume skips a damaged newest checkpoint with a warning (and never starts over), a full disk says so and
leaves no temporary folder, a crafted checkpoint runs no code, and whatever is refused is left byte for
byte as it was."""

import contextlib
import dataclasses
import errno
import io
import json
import os
import pickle
import re
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.multiprocessing as mp
from torch import nn

import checkpoints.io as ckpt_io
from checkpoints.convert import convert
from checkpoints.io import DamagedCheckpointError, load_checkpoint, resume_path, save_checkpoint
from model.config import ModelConfig
from model.gpt import GPT


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def trained(seed: int = 0):
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).pow(2).mean().backward()
    optimizer.step()
    return model, optimizer


def snapshot(root) -> dict[str, bytes]:
    """Every file under root (hidden ones too) and its bytes: what "left as it was" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def save_two(tmp_path):
    model, optimizer = trained()
    first = save_checkpoint(tmp_path, 1, model, optimizer, extra={"at": 1}, config={"lr": 1}, keep_last=0)
    second = save_checkpoint(tmp_path, 2, model, optimizer, extra={"at": 2}, config={"lr": 1}, keep_last=0)
    return first, second


def damage(path, how):
    """Damage one checkpoint as a copy cut short, a lost file or a flipped bit would."""
    data = path / "__0_0.distcp"
    if how == "truncated_data":
        data.write_bytes(data.read_bytes()[:200])
        return "__0_0.distcp has 200 bytes"
    if how == "missing_data":
        data.unlink()
        return "__0_0.distcp is missing"
    if how == "changed_data":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        return "__0_0.distcp does not match the CRC-32"
    if how == "empty_meta":
        (path / "meta.json").write_text("")
        return "meta.json: empty file"
    if how == "corrupt_meta":
        (path / "meta.json").write_text('{"step": 2,\n "config": {"lr": 1}')
        return "meta.json: invalid JSON at line 2, column 21: Expecting ',' delimiter"
    if how == "missing_metadata":
        (path / ".metadata").unlink()
        return ".metadata is missing"
    raise ValueError(how)


HOW = ["truncated_data", "missing_data", "changed_data", "empty_meta", "corrupt_meta", "missing_metadata"]


@pytest.mark.parametrize("how", HOW)
def test_damage_is_named_before_loading(tmp_path, how):
    _, second = save_two(tmp_path)
    expected = damage(second, how)
    before = snapshot(tmp_path)
    model, optimizer = trained(seed=5)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(DamagedCheckpointError) as info:
        load_checkpoint(second, model, optimizer)
    assert str(second) in str(info.value) and expected in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # nothing read into the model
    assert snapshot(tmp_path) == before


def test_truncated_data_without_a_file_list_names_file_and_checkpoint(tmp_path):
    """A checkpoint that lists no files (written before they were listed): DCP's own read fails, and the
    error still names the file and the checkpoint, not torch's "PytorchStreamReader failed"."""
    _, second = save_two(tmp_path)
    meta = json.loads((second / "meta.json").read_text())
    del meta["files"]
    (second / "meta.json").write_text(json.dumps(meta))
    damage(second, "truncated_data")
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"checkpoint {second} is damaged: __0_0.distcp "
                                                               "cannot be read (truncated or corrupt")):
        load_checkpoint(second, *trained())


@pytest.mark.parametrize("how", HOW)
def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path, how):
    first, second = save_two(tmp_path)
    expected = damage(second, how)
    before = snapshot(tmp_path)
    with pytest.warns(UserWarning) as warned:
        assert resume_path(tmp_path, "auto") == first
    message = str(warned[0].message)
    assert f"checkpoint {second}" in message and expected in message and f"resuming from {first}" in message.replace(
        "the newest checkpoint that loads, ", "")
    step, extra, _ = load_checkpoint(first, *trained(seed=3))
    assert (step, extra) == (1, {"at": 1})
    assert snapshot(tmp_path) == before  # the damaged checkpoint is kept as it was, for inspection

    # Named by path, a damaged checkpoint is refused, not swapped for another.
    with pytest.raises(DamagedCheckpointError, match=re.escape(str(second))):
        resume_path(tmp_path, str(second))


def test_resume_never_starts_over_when_every_checkpoint_is_damaged(tmp_path):
    first, second = save_two(tmp_path)
    damage(first, "empty_meta")
    damage(second, "truncated_data")
    before = snapshot(tmp_path)
    with pytest.raises(DamagedCheckpointError) as info:
        resume_path(tmp_path, "auto")
    message = str(info.value)
    assert str(first) in message and str(second) in message and "--checkpoint.resume" in message
    assert snapshot(tmp_path) == before
    assert resume_path(tmp_path / "fresh", "auto") is None  # no checkpoints at all: a fresh run


class _FullDisk(io.RawIOBase):
    """A file that takes `budget` bytes and then fails as a full disk does (or with `error`)."""

    def __init__(self, f, budget, error):
        self.f, self.budget, self.error = f, budget, error

    def write(self, b):
        if self.budget < len(b):
            raise self.error
        self.budget -= len(b)
        return self.f.write(b)

    def writable(self):
        return True

    def tell(self):
        return self.f.tell()

    def flush(self):
        return self.f.flush()


def _fail_writes(monkeypatch, error, budget=200):
    original = dcp_fs.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with original(self, path, mode) as stream:
            yield _FullDisk(stream, budget, error) if "w" in mode and str(path).endswith(".distcp") else stream

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", create_stream)


def test_full_disk_says_so_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """DCP turns the disk-full OSError into torch's "enforce fail at inline_container.cc" inside its
    CheckpointException, which is not an Exception: the save still cleans up and names the cause."""
    first, _ = save_two(tmp_path)
    before = snapshot(tmp_path)
    _fail_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(RuntimeError, match=re.escape(f"no space left writing checkpoint {tmp_path / 'step-00000003'}")):
        save_checkpoint(tmp_path, 3, *trained(), extra={}, config={"lr": 1}, keep_last=1)
    assert snapshot(tmp_path) == before  # no .tmp-step-00000003, nothing pruned, nothing changed
    monkeypatch.undo()
    assert load_checkpoint(first, *trained(seed=2))[1] == {"at": 1}


def test_full_disk_is_recognised_when_the_errno_is_lost(tmp_path, monkeypatch):
    """On several ranks DCP pickles each rank's exception to rank 0 and the OSError behind torch's message is
    dropped: less free space than the checkpoint needs then identifies a full disk."""
    save_two(tmp_path)
    before = snapshot(tmp_path)
    _fail_writes(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    with pytest.raises(RuntimeError, match=re.escape(f"saving checkpoint {tmp_path / 'step-00000003'} failed: "
                                                     "RuntimeError: [enforce fail")):
        save_checkpoint(tmp_path, 3, *trained(), extra={}, config={}, keep_last=1)  # plenty of space: not "no space"
    free = ckpt_io.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt_io.shutil, "disk_usage", lambda path: free._replace(free=100))
    with pytest.raises(RuntimeError, match=re.escape(f"no space left writing checkpoint {tmp_path / 'step-00000003'}")):
        save_checkpoint(tmp_path, 3, *trained(), extra={}, config={}, keep_last=1)
    assert snapshot(tmp_path) == before


def test_interrupt_during_save_cleans_up_and_is_raised_as_itself(tmp_path, monkeypatch):
    save_two(tmp_path)
    before = snapshot(tmp_path)
    _fail_writes(monkeypatch, KeyboardInterrupt())  # inside DCP: wrapped into its CheckpointException
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, *trained(), extra={}, config={}, keep_last=1)
    assert snapshot(tmp_path) == before
    monkeypatch.undo()

    def interrupt(stage):  # outside DCP: after the data is written, before the commit
        if stage == "before_rename":
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_io, "_fault_hook", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, *trained(), extra={}, config={}, keep_last=1)
    assert snapshot(tmp_path) == before


class _RunsCode:
    """A pickle that calls os.system when loaded (how a crafted checkpoint would run code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    model, optimizer = trained()
    path = save_checkpoint(tmp_path / "run", 1, model, None, extra={"model_config": {}}, config={}, keep_last=0)
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]  # a crafted folder lists what it likes; the unpickler must hold on its own
    (path / "meta.json").write_text(json.dumps(meta))

    refused = re.escape(f"checkpoint {path}: refusing to unpickle .metadata: ") + r"\w+\.system is not part of DCP"
    for attempt in (lambda: load_checkpoint(path, make_model(), None),  # resume, verified first
                    lambda: load_checkpoint(path, make_model(), None, verify=False),  # DCP's own read
                    lambda: convert(path, tmp_path / "hf")):
        with pytest.raises(DamagedCheckpointError, match=refused):
            attempt()
        assert not marker.exists()
    assert not (tmp_path / "hf").exists()

    # Resume treats it as damage: an older intact checkpoint is used, with a warning naming this one.
    older = save_checkpoint(tmp_path / "run", 0, model, None, extra={}, config={}, keep_last=0)
    with pytest.warns(UserWarning, match=re.escape(f"checkpoint {path}: refusing to unpickle")):
        assert resume_path(tmp_path / "run", "auto") == older
    assert not marker.exists()


def test_crafted_optimizer_entry_runs_no_code(tmp_path):
    """DCP stores non-tensor entries (optimizer hyperparameters) as pickles too."""
    marker = tmp_path / "code-ran"
    model, optimizer = trained()
    state = ckpt_io._get_state(model, optimizer, trainable_only=False)
    state["optim"]["param_groups"][0]["lr"] = _RunsCode(marker)
    path = tmp_path / "step-00000001"
    ckpt_io._dcp(ckpt_io.dcp.save, state, path)
    (path / "meta.json").write_text(json.dumps({"step": 1, "trainable_only": False, "config": {}, "extra": {}}))
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"checkpoint {path}: refusing to unpickle the entry "
                                                               "'optim.param_groups.0.lr'")):
        load_checkpoint(path, *trained(seed=1))
    assert not marker.exists()


def test_convert_names_what_is_not_a_checkpoint(tmp_path):
    data = tmp_path / "tokens"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"format_version": 1, "dtype": "uint16", "vocab_size": 10,
                                                "shards": {"train": []}}))
    with pytest.raises(DamagedCheckpointError, match=r"meta\.json: missing keys 'step', 'trainable_only', 'config', "
                                                     r"'extra' .*token data made by train/corpus\.py"):
        convert(data, tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match=r"empty[/\\]meta\.json not found"):
        (tmp_path / "empty").mkdir()
        convert(tmp_path / "empty", tmp_path / "hf")
    model, _ = trained()
    path = save_checkpoint(tmp_path / "run", 1, model, None, extra={}, config={}, keep_last=0)
    with pytest.raises(ValueError, match="no extra.model_config"):
        convert(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_convert_verifies_the_files(tmp_path):
    cfg = ModelConfig.preset("tiny", vocab_size=64, num_layers=1)
    model = GPT(cfg)
    model.init_weights(seed=0)
    path = save_checkpoint(tmp_path / "run", 1, model, None, extra={"model_config": dataclasses.asdict(cfg)},
                           config={}, keep_last=0)
    damage(path, "truncated_data")
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"checkpoint {path} is damaged: __0_0.distcp has 200")):
        convert(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _two_ranks(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, optimizer = trained()  # the same replica on both ranks
        save_checkpoint(root, 1, model, optimizer, extra={"at": 1}, config={}, keep_last=0)
        second = save_checkpoint(root, 2, model, optimizer, extra={"at": 2}, config={}, keep_last=0)
        names = sorted(json.loads((second / "meta.json").read_text())["files"])
        if rank == 0:  # a changed byte in a file that rank 1 checksums: rank 0 must learn of it too
            assert names.index("__0_0.distcp") % 2 == 1, names
            damage(second, "changed_data")
        dist.barrier()
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            chosen = resume_path(root, "auto")
        step, extra, _ = load_checkpoint(chosen, *trained(seed=4), verify=False)
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump({"chosen": str(chosen), "step": step, "warned": [str(w.message) for w in warned]}, f)
    finally:
        dist.destroy_process_group()
    # As in tests/test_checkpoint_io.py: skip an interpreter teardown that gloo sometimes aborts.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_ranks_share_the_checksums_and_agree_on_the_fallback(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_ranks, args=(port, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["chosen"] for r in results] == [str(tmp_path / "step-00000001")] * 2
    assert [r["step"] for r in results] == [1, 1]
    assert len(results[0]["warned"]) == 1 and not results[1]["warned"]  # rank 0 warns, once
    assert f"checkpoint {tmp_path / 'step-00000002'} is damaged: __0_0.distcp does not match the CRC-32" in (
        results[0]["warned"][0])
