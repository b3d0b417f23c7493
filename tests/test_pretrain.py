"""The pretraining loop end to end on CPU: invariances, FSDP2 / HSDP vs one process, resume,
faults, the HF export, and bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from checkpoints import io as ckpt_io
from checkpoints.io import latest_checkpoint
from tests.conftest import ROOT
from model import gpt
from train.config import parse_config
from train.corpus import prepare
from train.pretrain import PretrainConfig, main

CORPUS = ROOT / "train" / "assets" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-data")
    text = root / "shakespeare-head.txt"
    text.write_text(CORPUS.read_text()[:120_000])
    out = root / "shards"
    prepare([text], out, vocab_size=320, val_fraction=0.1, progress=False, workers=1)
    return out


def args_for(data_dir, out_dir, *extra):
    return [
        "--config", str(ROOT / "configs/pretrain/tiny.yaml"),
        "--out_dir", str(out_dir), "--data.dir", str(data_dir), "--data.inputs", "[]", "--model.vocab_size", "320",
        "--log.every", "1", "--sample_tokens", "0", "--eval_every", "0", "--eval_batches", "1",
        "--optim.warmup_steps", "1", "--optim.lr", "3e-3", *extra,
    ]


def run_inprocess(data_dir, out_dir, *extra):
    return main(parse_config(PretrainConfig, args_for(data_dir, out_dir, *extra)))


def run_torchrun(data_dir, out_dir, nproc, *extra, nnodes=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "-m", "train.pretrain", *args_for(data_dir, out_dir, *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def losses(out_dir, split="train"):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradient_accumulation_matches_bigger_batch(data_dir, tmp_path):
    run_inprocess(data_dir, tmp_path / "a", "--global_batch", "4", "--micro_batch", "1", "--steps", "3")
    run_inprocess(data_dir, tmp_path / "b", "--global_batch", "4", "--micro_batch", "4", "--steps", "3")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5)
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_fsdp_and_hsdp_match_single_process(data_dir, tmp_path):
    run_inprocess(data_dir, tmp_path / "one", "--global_batch", "4", "--micro_batch", "2", "--steps", "3")
    run_torchrun(data_dir, tmp_path / "fsdp", 2, "--global_batch", "4", "--micro_batch", "2", "--steps", "3")
    run_torchrun(data_dir, tmp_path / "hsdp", 2, "--global_batch", "4", "--micro_batch", "2", "--steps", "3",
                 "--parallel.dp_replicate", "2")
    one = losses(tmp_path / "one")
    for run in ("fsdp", "hsdp"):
        other = losses(tmp_path / run)
        for step in (1, 2, 3):
            assert other[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), (run, step)
            assert other[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-4), (run, step)


def test_resume_equals_uninterrupted_run(data_dir, tmp_path):
    common = ("--global_batch", "4", "--micro_batch", "2")
    run_inprocess(data_dir, tmp_path / "full", *common, "--steps", "6")
    run_inprocess(data_dir, tmp_path / "split", *common, "--steps", "6", "--stop_at_step", "3")
    run_inprocess(data_dir, tmp_path / "split", *common, "--steps", "6")
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    for step in range(1, 7):
        assert split[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6), step


@pytest.mark.slow
def test_resume_across_world_sizes(data_dir, tmp_path):
    common = ("--global_batch", "4", "--micro_batch", "2")
    run_inprocess(data_dir, tmp_path / "full", *common, "--steps", "4")
    run_torchrun(data_dir, tmp_path / "split", 2, *common, "--steps", "4", "--stop_at_step", "2")
    run_inprocess(data_dir, tmp_path / "split", *common, "--steps", "4")
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    for step in range(1, 5):
        assert split[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5), step


def test_killed_checkpoint_save_keeps_previous(data_dir, tmp_path, monkeypatch):
    common = ("--global_batch", "4", "--micro_batch", "2", "--checkpoint.every", "2")
    run_inprocess(data_dir, tmp_path, *common, "--steps", "2")
    assert latest_checkpoint(tmp_path).name == "step-00000002"

    def crash(stage):
        if stage == "before_rename":
            raise OSError("simulated kill during the checkpoint write")

    monkeypatch.setattr(ckpt_io, "_fault_hook", crash)
    with pytest.raises(RuntimeError, match="saving checkpoint .*step-00000004 failed"):
        run_inprocess(data_dir, tmp_path, *common, "--steps", "4")
    monkeypatch.setattr(ckpt_io, "_fault_hook", None)
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    result = run_inprocess(data_dir, tmp_path, *common, "--steps", "4")
    assert result["step"] == 4


def test_nonfinite_loss_stops_with_the_step_and_keeps_checkpoint(data_dir, tmp_path, monkeypatch):
    common = ("--global_batch", "4", "--micro_batch", "2", "--checkpoint.every", "1")
    real = gpt.linear_cross_entropy_sum
    calls = {"n": 0}

    def poisoned(hidden, weight, targets):
        calls["n"] += 1
        loss = real(hidden, weight, targets)
        return loss * float("nan") if calls["n"] > 4 else loss  # NaN from step 3 (2 micro-batches a step)

    monkeypatch.setattr(gpt, "linear_cross_entropy_sum", poisoned)
    with pytest.raises(FloatingPointError, match="step 3"):
        run_inprocess(data_dir, tmp_path, *common, "--steps", "5")
    assert latest_checkpoint(tmp_path).name == "step-00000002"

    calls["n"] = 0
    result = run_inprocess(data_dir, tmp_path / "skip", *common, "--steps", "5", "--nonfinite", "skip")
    assert result["step"] == 5
    assert json.loads((latest_checkpoint(tmp_path / "skip") / "meta.json").read_text())["extra"]["skipped_steps"] == 3


def test_final_export_loads_in_transformers(data_dir, tmp_path):
    import transformers

    from checkpoints.convert import convert
    from model.gpt import GPT
    from train.config import resolve_model

    run_inprocess(data_dir, tmp_path, "--steps", "2", "--global_batch", "2", "--micro_batch", "2")
    final = tmp_path / "final"
    ref = transformers.AutoModelForCausalLM.from_pretrained(final, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok.encode("ROMEO: what light through yonder window breaks")])
    # Our model from the training checkpoint, not from the export, so the export itself is tested.
    cfg = parse_config(PretrainConfig, args_for(data_dir, tmp_path))
    mcfg, _ = resolve_model(cfg.model)
    ours = GPT(mcfg)
    ours.reset_rope()
    ckpt_io.load_checkpoint(latest_checkpoint(tmp_path), ours, None)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)
    # The conversion CLI's function gives the same files.
    convert(latest_checkpoint(tmp_path), tmp_path / "converted")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "converted", attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref(ids).logits)


@pytest.mark.slow
def test_sigterm_saves_and_exits(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "train.pretrain", *args_for(data_dir, tmp_path, "--steps", "100000",
                                                             "--global_batch", "2", "--micro_batch", "2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped at step" in out
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and json.loads((ckpt / "meta.json").read_text())["step"] > 0


@pytest.mark.slow
def test_two_nodes_over_localhost(data_dir, tmp_path):
    """Two torchrun launches with --nnodes=2 (one process each), c10d rendezvous on localhost."""
    port = _free_port()
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "handloom-test"]
    train = ["-m", "train.pretrain", *args_for(data_dir, tmp_path / "two", "--steps", "2", "--global_batch", "4",
                                                "--micro_batch", "2")]
    procs = [subprocess.Popen(base + ["--node_rank", str(i)] + train, cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    run_inprocess(data_dir, tmp_path / "one", "--steps", "2", "--global_batch", "4", "--micro_batch", "2")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in (1, 2):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5)


def test_bad_inputs_name_the_field(data_dir, tmp_path):
    with pytest.raises(ValueError, match="data.seq_len 4096 exceeds the model's max_seq_len 256"):
        run_inprocess(data_dir, tmp_path / "a", "--data.seq_len", "4096")
    with pytest.raises(ValueError, match=r"model vocab_size 100 is smaller than the tokenizer's 320 .*meta.json"):
        run_inprocess(data_dir, tmp_path / "b", "--model.vocab_size", "100")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run_inprocess(tmp_path / "nodata", tmp_path / "c", "--data.inputs", f"[{empty}]")
    # A run folder holding a different run: resuming there names the differing key.
    run_inprocess(data_dir, tmp_path / "d", "--steps", "1", "--global_batch", "2", "--micro_batch", "2")
    with pytest.raises(ValueError, match="optim.lr"):
        run_inprocess(data_dir, tmp_path / "d", "--steps", "2", "--global_batch", "2", "--micro_batch", "2",
                      "--optim.lr", "1e-2")


def test_a_data_dir_made_from_other_inputs_is_an_error(data_dir, tmp_path):
    """data.dir already prepared: the same inputs reuse it; other inputs (or another split) are named
    in an error before training, rather than trained on silently."""
    text = data_dir.parent / "shakespeare-head.txt"
    same = ("--data.inputs", f"[{text}]", "--data.tokenizer_vocab_size", "320", "--data.val_fraction", "0.1",
            "--steps", "1", "--global_batch", "2", "--micro_batch", "2")
    run_inprocess(data_dir, tmp_path / "same", *same)
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[:50_000])
    with pytest.raises(ValueError, match=r"prepared from other inputs \(inputs: .*delete"):
        run_inprocess(data_dir, tmp_path / "other", *same[:1], f"[{other}]", *same[2:])
    with pytest.raises(ValueError, match=r"prepared from other inputs \(val_fraction"):
        run_inprocess(data_dir, tmp_path / "split", *same[:5], "0.2", *same[6:])


def test_every_yaml_config_parses():
    from train.config import parse_config as parse

    from train.dpo import DPOConfig
    from train.grpo import GRPOConfig
    from train.lora import LORA_DEFAULTS
    from train.sft import SFTConfig

    loops = {"pretrain": (PretrainConfig, None), "sft": (SFTConfig, None), "lora": (SFTConfig, LORA_DEFAULTS),
             "dpo": (DPOConfig, None), "grpo": (GRPOConfig, None)}
    files = sorted((ROOT / "configs").glob("*/*.yaml"))
    assert files
    for f in files:
        loop = f.parent.name
        assert loop in loops, f"{f}: no loop named {loop}"
        yaml.safe_load(f.read_text())
        cls, defaults = loops[loop]
        parse(cls, ["--config", str(f)], defaults=defaults)
