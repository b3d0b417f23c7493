"""train/plot.py: curves.png of a run and the comparison command, from metrics.jsonl files written by the real
MetricsLogger; PNG files of the expected pixel size; no matplotlib gives None and a hint, never an error."""

import json
import struct
import subprocess
import sys
import warnings

import pytest

from tests.conftest import ROOT
from train import plot
from train.config import LogConfig
from train.log import MetricsLogger

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG spec puts first, right after the 8-byte signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    length, kind, width, height = struct.unpack(">I4sII", head[8:24])
    assert kind == b"IHDR" and length == 13
    return width, height


def write_run(run_dir, steps=6, tokens_per_step=512, dpo=False, loss0=5.0):
    """A run's metrics.jsonl through the loops' own logger: train rows every step, val rows every 3 steps."""
    logger = MetricsLogger(run_dir, LogConfig(every=1), enabled=True)
    for step in range(1, steps + 1):
        row = {"loss": loss0 / step, "lr": 1e-3 * min(1.0, step / 2), "grad_norm": 2.0 / step,
               "tokens": step * tokens_per_step, "tokens_per_s": 1000.0 + step, "eta_s": 1.0, "mfu": None}
        if dpo:
            row.update({"rewards/chosen": 0.1 * step, "rewards/rejected": -0.1 * step,
                        "rewards/margins": 0.2 * step, "rewards/accuracies": min(1.0, 0.5 + 0.1 * step),
                        "entropy_bonus": 0.01})  # a metric plot.py has no panel for: it gets its own
        logger.log(step, row, steps)
        if step % 3 == 0:
            logger.log(step, {"loss": loss0 / step + 0.1}, steps, prefix="val")
    logger.close()
    return run_dir


def test_sft_run_curves(tmp_path):
    run = write_run(tmp_path / "sft")
    out = plot.write_curves(run)
    assert out == run / "curves.png" and out.is_file()
    # loss against step, loss against tokens, lr, grad norm, tokens/s: 5 panels of 450 x 300 px, 3 to a row.
    assert png_size(out) == (3 * 450, 2 * 300)
    assert not list(run.glob("*.tmp.png"))


def test_dpo_run_gets_reward_and_accuracy_panels(tmp_path):
    run = write_run(tmp_path / "dpo", dpo=True)
    panels = plot.curve_panels(plot.read_metrics(run / "metrics.jsonl"))
    assert ("implicit rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"], "step") in panels
    assert ("preference accuracy", ["rewards/accuracies"], "step") in panels
    assert ("entropy_bonus", ["entropy_bonus"], "step") in panels
    assert not any("mfu" in keys for _, keys, _ in panels)  # logged as null on CPU: nothing to draw
    # The 5 panels of any run, the 2 DPO panels and the unnamed metric: 8 panels, 3 rows of 3.
    assert len(panels) == 8
    assert png_size(plot.write_curves(run)) == (3 * 450, 3 * 300)


def test_compare_command_overlays_two_runs(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", tokens_per_step=1024, loss0=4.0)
    out = tmp_path / "cmp" / "compare.png"
    proc = subprocess.run([sys.executable, "-m", "train.plot", str(a), str(b), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (800, 500)
    # In process: against step, another metric, smoothed.
    by_step = plot.compare([a, b], tmp_path / "by_step.png", x="step", metric="grad_norm", smooth=0.5)
    assert png_size(by_step) == (800, 500)


def test_compare_names_what_is_missing(tmp_path):
    a = write_run(tmp_path / "a")
    with pytest.raises(ValueError, match="logs no 'reward'"):
        plot.compare([a], tmp_path / "x.png", metric="reward")
    with pytest.raises(FileNotFoundError, match="nope"):
        plot.compare([a, tmp_path / "nope"], tmp_path / "x.png")


def test_without_matplotlib_a_hint_once_and_none(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run")
    capsys.readouterr()
    # A None entry in sys.modules makes the import raise ImportError, as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.setattr(plot, "_hinted", False)
    assert plot.write_curves(run) is None
    assert plot.write_curves(run) is None
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed") == 1 and "pip install" in err
    assert len(err.strip().splitlines()) == 1
    assert not (run / "curves.png").exists()


def test_resumed_and_torn_files(tmp_path):
    # A run resumed from step 2 logs steps 3.. again; a kill mid-write leaves half a last line.
    run = write_run(tmp_path / "run", steps=4)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "split": "train", "loss": 0.5, "tokens": 1536}) + "\n")
        f.write('{"step": 4, "split": "tr')
    metrics = plot.read_metrics(run / "metrics.jsonl")
    assert [r["loss"] for r in metrics["train"].values()] == [5.0, 2.5, 0.5, 1.25]
    assert list(metrics["val"]) == [3]
    assert plot.write_curves(run).is_file()


def test_a_broken_file_warns_and_never_raises(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 0.5}\n')
    with pytest.warns(UserWarning, match="metrics.jsonl:2: not a JSON line"):
        assert plot.write_curves(run) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot.write_curves(tmp_path / "no_run_here") is None  # nothing logged yet: nothing to draw
