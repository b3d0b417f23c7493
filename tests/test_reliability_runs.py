"""Whole runs under faults (issue 12), through the pretraining loop's main(cfg) on a tiny model: a resume
refused because the config changed leaves the run folder byte for byte as it was, and a damaged newest
checkpoint is skipped with a warning, the run resuming from the one before exactly as if never stopped."""

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT
from train.config import parse_config
from train.corpus import prepare
from train.pretrain import PretrainConfig, main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-data")
    text = root / "shakespeare-head.txt"
    text.write_text((ROOT / "train" / "assets" / "tinyshakespeare.txt").read_text()[:60_000])
    out = root / "shards"
    prepare([text], out, vocab_size=320, val_fraction=0.1, progress=False, workers=1)
    return out


def run(data_dir, out_dir, *extra):
    return main(parse_config(PretrainConfig, [
        "--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--out_dir", str(out_dir), "--data.dir", str(data_dir),
        "--data.inputs", "[]",
        "--model.vocab_size", "320", "--log.every", "1", "--sample_tokens", "0", "--eval_every", "0",
        "--eval_batches", "1", "--optim.warmup_steps", "1", "--optim.lr", "3e-3", "--global_batch", "2",
        "--micro_batch", "2", "--checkpoint.export_hf", "false", *extra]))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_refused_resume_leaves_the_run_folder_as_it_was(data_dir, tmp_path):
    run(data_dir, tmp_path, "--steps", "3", "--stop_at_step", "1")  # a run stopped at step 1, to be resumed
    before = snapshot(tmp_path)
    assert "config.yaml" in before and "step-00000001/meta.json" in before
    with pytest.raises(ValueError, match=r"optim.lr: checkpoint 0.003, current 0.01"):
        run(data_dir, tmp_path, "--steps", "3", "--optim.lr", "1e-2")
    with pytest.raises(ValueError, match=r"invalid config:\n  micro_batch: 0 must be >= 1"):
        run(data_dir, tmp_path, "--steps", "3", "--micro_batch", "0")
    assert snapshot(tmp_path) == before


def test_damaged_newest_checkpoint_is_skipped_and_resume_stays_exact(data_dir, tmp_path):
    run(data_dir, tmp_path / "full", "--steps", "3")
    run(data_dir, tmp_path / "split", "--steps", "3", "--stop_at_step", "2", "--checkpoint.every", "1")
    newest = tmp_path / "split" / "step-00000002"
    data = newest / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])  # a copy cut short
    with pytest.warns(UserWarning, match=rf"checkpoint {newest} is damaged: __0_0.distcp has 1000 bytes"):
        result = run(data_dir, tmp_path / "split", "--steps", "3", "--checkpoint.every", "1")
    assert result["step"] == 3
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")  # split logs step 2 twice: the last wins
    assert split.keys() == full.keys()
    for step in full:  # resumed from step 1: the same losses (bit for bit on one machine; rounded in the log)
        assert split[step] == pytest.approx(full[step], rel=1e-6), step
