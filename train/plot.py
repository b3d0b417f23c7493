"""Loss curves as pictures, from a run's metrics.jsonl alone.

    write_curves("runs/sft")    # -> runs/sft/curves.png: every panel the run's metrics allow
    python -m train.plot runs/a runs/b --out compare.png [--x tokens|step] [--metric loss] [--smooth 0.9]

The loops call `write_curves(out_dir)` on rank 0 when they end and at each checkpoint. The comparison
command overlays several runs' curves for the everyday "did my change help?"; it reads nothing but the
runs' metrics.jsonl files, so it works on runs copied from another machine.

matplotlib is optional (`pip install -e '.[plot]'`): without it `write_curves` prints a one-line hint once
and returns None. A picture is never worth a crashed run, so `write_curves` turns any error into a warning.
It draws through matplotlib's object API on an Agg canvas, never pyplot, so it changes no global backend
and opens no window.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

# What MetricsLogger writes that is bookkeeping, not a curve.
NOT_CURVES = {"step", "split", "time", "eta_s", "tokens"}
# Panels drawn when any of their keys is logged, in this order: (title, keys). Train and eval rows of a key
# share its panel. Keys logged but named nowhere here still get a panel each (OTHER_PANELS at most), so a
# new metric shows up without touching this file.
PANELS = [
    ("learning rate", ["lr"]),
    ("grad norm", ["grad_norm"]),
    ("tokens/s", ["tokens_per_s"]),
    ("trained tokens per step", ["trained_tokens"]),
    # DPO and its variants (TRL's names): implicit rewards beta * (log pi - log pi_ref) of each answer.
    ("implicit rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("preference accuracy", ["rewards/accuracies"]),
    ("log-probs", ["logps/chosen", "logps/rejected"]),
    # GRPO: the mean reward of the sampled completions and its spread within groups.
    ("reward", ["reward", "reward_std"]),
    ("KL to the reference", ["kl"]),
    ("completion length", ["completion_length"]),
    ("clipped fraction", ["clip_ratio"]),
    ("MFU", ["mfu"]),
    ("peak memory (GiB)", ["peak_mem_gib"]),
]
OTHER_PANELS = 6
COLUMNS = 3
PANEL_INCHES = (4.5, 3.0)  # (width, height) of one panel
DPI = 100  # so one panel is 450 x 300 pixels
COMPARE_INCHES = (8.0, 5.0)  # the comparison picture: 800 x 500 pixels
MAX_POINTS = 20_000  # per line; longer series are thinned by a stride (a plot cannot show more anyway)

_hinted = False


def read_metrics(path: str | Path) -> dict[str, dict[int, dict]]:
    """metrics.jsonl as {split: {step: record}}. A resumed run appends to the same file and may log a step
    again; the last record of a step wins, as it is the run that went on."""
    out: dict[str, dict[int, dict]] = {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed mid-write leaves a torn last line; skip it
                break
            raise ValueError(f"{path}:{n}: not a JSON line")
        out.setdefault(record.get("split", "train"), {})[int(record["step"])] = record
    return {split: dict(sorted(rows.items())) for split, rows in out.items()}


def series(rows: dict[int, dict], key: str, x: str = "step",
           tokens_at: dict[int, float] | None = None) -> tuple[list[float], list[float]]:
    """(xs, ys) of `key` over the rows that log it as a finite number. With x="tokens", a row without its own
    token count (an eval row) takes the count logged by the train row of the same step in `tokens_at`."""
    xs, ys = [], []
    for step, r in rows.items():
        v = r.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            continue
        if x == "step":
            xs.append(step)
        else:
            t = r.get("tokens", (tokens_at or {}).get(step))
            if t is None:
                continue
            xs.append(t)
        ys.append(v)
    stride = max(1, len(xs) // MAX_POINTS)
    return xs[::stride], ys[::stride]


def _matplotlib():
    """The Figure class and the Agg canvas, or None (with a one-line hint, once) when matplotlib is absent."""
    global _hinted
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _hinted:
            print("curves.png skipped: matplotlib is not installed (pip install 'matplotlib>=3.7', or "
                  "pip install -e '.[plot]')", file=sys.stderr, flush=True)
            _hinted = True
        return None
    return Figure, FigureCanvasAgg


def _figure(mpl, n_panels: int, panel_inches: tuple[float, float] = PANEL_INCHES):
    """A figure of n panels in rows of COLUMNS, each panel_inches large, on an Agg canvas; and its axes."""
    Figure, FigureCanvasAgg = mpl
    rows, cols = math.ceil(n_panels / COLUMNS), min(n_panels, COLUMNS)
    fig = Figure(figsize=(panel_inches[0] * cols, panel_inches[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]


def _draw(ax, metrics: dict[str, dict[int, dict]], keys: list[str], x: str, tokens_at: dict[int, float]) -> None:
    """Each key's train curve as a line, its eval points (any split but train) dashed with markers."""
    for key in keys:
        for split, rows in metrics.items():
            xs, ys = series(rows, key, x, tokens_at)
            if not xs:
                continue
            label = key if split == "train" else f"{split} {key}"
            if split == "train":
                ax.plot(xs, ys, linewidth=1.0, label=label)
            else:
                ax.plot(xs, ys, "o--", markersize=3, linewidth=1.0, label=label)
    ax.set_xlabel(x)
    if x == "step":
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if len(ax.get_lines()) > 1:
        ax.legend(fontsize=7)


def curve_panels(metrics: dict[str, dict[int, dict]]) -> list[tuple[str, list[str], str]]:
    """The panels `write_curves` draws for these metrics, as (title, keys, x axis)."""
    logged = {k for rows in metrics.values() for r in rows.values() for k, v in r.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_CURVES}
    has_tokens = any("tokens" in r for r in metrics.get("train", {}).values())
    panels = []
    if "loss" in logged:
        panels.append(("loss", ["loss"], "step"))
        if has_tokens:
            panels.append(("loss", ["loss"], "tokens"))
    named = {"loss"}
    for title, keys in PANELS:
        named.update(keys)
        present = [k for k in keys if k in logged]
        if present:
            panels.append((title, present, "step"))
    others = sorted(logged - named)
    panels += [(k, [k], "step") for k in others[:OTHER_PANELS]]
    return panels


def write_curves(run_dir: str | Path) -> Path | None:
    """Draw `<run_dir>/metrics.jsonl` into `<run_dir>/curves.png` and return its path: loss (train and eval)
    against step and against tokens, learning rate, grad norm, tokens/s, and the reward, accuracy and KL
    panels of DPO and GRPO runs when those are logged. Returns None, never raises: without matplotlib (a
    hint is printed once), without metrics, or on any error (a warning)."""
    run_dir = Path(run_dir)
    try:
        mpl = _matplotlib()
        path = run_dir / "metrics.jsonl"
        if mpl is None or not path.is_file():
            return None
        metrics = read_metrics(path)
        panels = curve_panels(metrics)
        if not panels:
            return None
        tokens_at = {s: r["tokens"] for s, r in metrics.get("train", {}).items() if "tokens" in r}
        fig, axes = _figure(mpl, len(panels))
        for ax, (title, keys, x) in zip(axes, panels):
            _draw(ax, metrics, keys, x, tokens_at)
            ax.set_title(title if x == "step" else f"{title} against tokens", fontsize=10)
        fig.suptitle(run_dir.resolve().name, fontsize=11)
        out = run_dir / "curves.png"
        tmp = out.with_suffix(".tmp.png")  # written whole, then renamed: a viewer never sees half a file
        fig.savefig(tmp, format="png", dpi=DPI)
        tmp.replace(out)
        return out
    except Exception as e:  # noqa: BLE001  a plot must never end a training run
        warnings.warn(f"could not write {run_dir / 'curves.png'}: {type(e).__name__}: {e}", stacklevel=2)
        return None


def ema(ys: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0."""
    if not weight:
        return ys
    out, avg = [], 0.0
    for i, y in enumerate(ys, 1):
        avg = weight * avg + (1 - weight) * y
        out.append(avg / (1 - weight**i))
    return out


def compare(run_dirs: list[str | Path], out: str | Path, x: str = "tokens", metric: str = "loss",
            smooth: float = 0.0) -> Path:
    """Overlay `metric` of several runs against tokens (or step) in one picture: each run's train curve as a
    line, its eval points in the same colour, dashed. Raises when a run has no metrics.jsonl or never logs
    `metric` (or, with x="tokens", a token count)."""
    mpl = _matplotlib()
    if mpl is None:
        raise SystemExit("python -m train.plot needs matplotlib: pip install 'matplotlib>=3.7'")
    dirs = [Path(d) for d in run_dirs]
    # Label each run by its folder name, or by its path where two runs share a name.
    names = [d.resolve().name for d in dirs]
    labels = [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]
    fig, (ax,) = _figure(mpl, 1, COMPARE_INCHES)
    for d, label in zip(dirs, labels):
        path = d / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (is {d} a run folder?)")
        metrics = read_metrics(path)
        tokens_at = {s: r["tokens"] for s, r in metrics.get("train", {}).items() if "tokens" in r}
        if x == "tokens" and not tokens_at:
            raise ValueError(f"{path} logs no token counts; compare against --x step")
        drawn = False
        color = None
        for split, rows in metrics.items():
            xs, ys = series(rows, metric, x, tokens_at)
            if not xs:
                continue
            if split == "train":
                (line,) = ax.plot(xs, ema(ys, smooth), linewidth=1.2, label=label, color=color)
            else:
                (line,) = ax.plot(xs, ys, "o--", markersize=3, linewidth=1.0, label=f"{label} ({split})", color=color)
            color, drawn = line.get_color(), True
        if not drawn:
            raise ValueError(f"{path} logs no {metric!r}")
    ax.set_xlabel(x)
    ax.set_ylabel(metric + (f" (train smoothed, EMA {smooth})" if smooth else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders, each with its metrics.jsonl")
    p.add_argument("--out", default="compare.png", help="the picture to write")
    p.add_argument("--x", choices=["tokens", "step"], default="tokens", help="the horizontal axis")
    p.add_argument("--metric", default="loss", help="the logged value to compare (loss, reward, rewards/margins...)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight for the train curves, 0 (raw) to <1")
    args = p.parse_args(argv)
    if not 0 <= args.smooth < 1:
        p.error("--smooth must be in [0, 1)")
    print(compare(args.runs, args.out, args.x, args.metric, args.smooth))


if __name__ == "__main__":
    main()
