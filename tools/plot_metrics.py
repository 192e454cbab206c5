"""PNG plots of a run directory's metrics.jsonl (train.py), written to RUN_DIR/plots/.

- ``loss.png``: the logged loss per step, the mean loss per epoch, the ln K line (a loss that stays near it
  means collapse, REFERENCE section 9), the end of the prototype freeze window and the epoch the queue comes in
  (both read from config.toml when present), collapse warnings and non-finite losses.
- ``lr.png``: the learning rate per step.
- ``samples_per_s.png``: training throughput per step.
- ``accuracy.png``: top-1 (and top-5 when logged) per epoch of every evaluation event (``{"event": "knn",
  "epoch", "top1"}``, ``"linear"``, ...), only when the file holds such lines.

A line that is not valid JSON (a run killed mid-write leaves a truncated last line; after ``--resume`` the next
line is appended to it) is skipped with a warning. Steps logged twice because a resumed run repeated them keep
the later value.

Usage::

    python tools/plot_metrics.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

METRICS_NAME = "metrics.jsonl"
PLOTS_DIR = "plots"


@dataclass
class RunMetrics:
    """The records of one metrics.jsonl, by kind, de-duplicated (a later record replaces an earlier one)."""

    steps: list[dict] = field(default_factory=list)  # sorted by iteration
    epochs: list[dict] = field(default_factory=list)  # sorted by epoch
    evals: dict[str, list[dict]] = field(default_factory=dict)  # event name -> records sorted by epoch
    markers: list[dict] = field(default_factory=list)  # collapse_warning / non_finite_loss events
    skipped_lines: list[int] = field(default_factory=list)  # 1-based numbers of lines that were not JSON


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse a metrics.jsonl. FileNotFoundError when missing, ValueError when it holds no usable record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory written by train.py (it holds "
                                f"{METRICS_NAME} from the first logged step on)")
    lines = path.read_text(errors="replace").splitlines()
    steps: dict[int, dict] = {}
    epochs: dict[int, dict] = {}
    evals: dict[str, dict[int, dict]] = {}
    run = RunMetrics()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            run.skipped_lines.append(number)
            continue
        if not isinstance(row, dict):
            run.skipped_lines.append(number)
            continue
        event = row.get("event")
        if event is None and "iteration" in row and "loss" in row:
            steps[int(row["iteration"])] = row
        elif event == "epoch" and "epoch" in row:
            epochs[int(row["epoch"])] = row
        elif event is not None and "top1" in row and "epoch" in row:
            evals.setdefault(str(event), {})[int(row["epoch"])] = row
        elif event in ("collapse_warning", "non_finite_loss") and "iteration" in row:
            run.markers.append(row)
    if run.skipped_lines:
        last = len(lines)
        where = ("the last line" if run.skipped_lines == [last] else
                 f"line{'s' if len(run.skipped_lines) > 1 else ''} {', '.join(map(str, run.skipped_lines))}")
        warnings.warn(f"{path}: {where} is not valid JSON and was skipped (a truncated write: a run killed "
                      "mid-line, possibly resumed since)", stacklevel=2)
    run.steps = [steps[k] for k in sorted(steps)]
    run.epochs = [epochs[k] for k in sorted(epochs)]
    run.evals = {name: [rows[k] for k in sorted(rows)] for name, rows in sorted(evals.items())}
    if not run.steps and not run.epochs and not run.evals:
        raise ValueError(f"{path} holds no training records (no step, epoch or evaluation lines): the run may not "
                         "have reached its first logged step yet")
    return run


def _read_config(run_dir: Path) -> dict:
    try:
        return tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _figure(title: str):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: .venv/bin/pip install matplotlib "
                           "(it is in the dev and demo extras)") from exc
    fig = Figure(figsize=(9, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _epoch_axis(ax, run: RunMetrics) -> None:
    """A top axis in epochs, when the epoch lines give a constant number of iterations per epoch."""
    if not run.epochs:
        return
    last = run.epochs[-1]
    per_epoch = last["iteration"] / (last["epoch"] + 1)
    if per_epoch <= 0:
        return
    top = ax.secondary_xaxis("top", functions=(lambda it: it / per_epoch, lambda ep: ep * per_epoch))
    top.set_xlabel("epoch (0-based; n = the start of epoch n)")


def _save(fig, out: Path) -> Path:
    fig.savefig(out)
    return out


def _plot_loss(run: RunMetrics, config: dict, out: Path, name: str) -> Path:
    fig, ax = _figure(f"{name}: SwAV loss")
    if run.steps:
        it = [r["iteration"] for r in run.steps]
        loss = [r["loss"] for r in run.steps]
        ax.plot(it, loss, lw=1, color="tab:blue", alpha=0.8, label="loss (logged steps)")
        bad = [i for i, v in zip(it, loss, strict=True) if not math.isfinite(v)]
        if bad:
            ax.plot(bad, [0] * len(bad), "x", color="red", transform=ax.get_xaxis_transform(),
                    label=f"non-finite loss ({len(bad)} steps)")
    if run.epochs:
        ax.plot([r["iteration"] for r in run.epochs], [r["loss"] for r in run.epochs], "o-", color="tab:orange",
                ms=4, lw=1.5, label="epoch mean loss")
    ln_k = next((r["ln_k"] for r in reversed(run.epochs) if "ln_k" in r), None)
    if ln_k is None and config.get("nmb_prototypes"):
        ln_k = math.log(config["nmb_prototypes"])
    if ln_k is not None:
        ax.axhline(ln_k, color="black", ls="--", lw=1, label=f"ln K = {ln_k:.3f} (collapse level)")
    freeze = config.get("freeze_prototypes_niters")
    if freeze:
        ax.axvline(freeze, color="tab:green", ls=":", lw=1.2, label=f"prototypes unfrozen (iteration {freeze})")
    queue_epoch = next((r["epoch"] for r in run.epochs if r.get("queue_in_use")), None)
    if queue_epoch is not None:  # the queue fills during the epoch it starts in: mark that epoch's start
        starts = {r["epoch"] + 1: r["iteration"] for r in run.epochs}
        starts[0] = 0
        if queue_epoch in starts:
            ax.axvline(starts[queue_epoch], color="tab:purple", ls=":", lw=1.2,
                       label=f"queue starts (epoch {queue_epoch})")
    for i, marker in enumerate(m for m in run.markers if m["event"] == "collapse_warning"):
        ax.axvline(marker["iteration"], color="red", lw=1, alpha=0.6, label="collapse warning" if i == 0 else None)
    non_finite = [m["iteration"] for m in run.markers if m["event"] == "non_finite_loss"]
    if non_finite:
        ax.plot(non_finite, [0.02] * len(non_finite), "X", color="red", ms=9, transform=ax.get_xaxis_transform(),
                label="run stopped: non-finite loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    _epoch_axis(ax, run)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, out)


def _plot_step_series(run: RunMetrics, key: str, ylabel: str, title: str, out: Path) -> Path | None:
    rows = [r for r in run.steps if key in r]
    if not rows:
        return None
    fig, ax = _figure(title)
    ax.plot([r["iteration"] for r in rows], [r[key] for r in rows], lw=1.2, color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    _epoch_axis(ax, run)
    return _save(fig, out)


def _plot_accuracy(run: RunMetrics, out: Path, name: str) -> Path:
    fig, ax = _figure(f"{name}: evaluation accuracy")
    for i, (event, rows) in enumerate(run.evals.items()):
        color = f"C{i}"
        epochs = [r["epoch"] + 1 for r in rows]  # logged with the 0-based epoch just finished
        ax.plot(epochs, [r["top1"] for r in rows], "o-", color=color, label=f"{event} top-1")
        if any("top5" in r for r in rows):
            ax.plot([e for e, r in zip(epochs, rows, strict=True) if "top5" in r],
                    [r["top5"] for r in rows if "top5" in r], "s--", color=color, alpha=0.6, label=f"{event} top-5")
    ax.set_xlabel("epochs completed")
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, out)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's plots (default RUN_DIR/plots/) and return their paths, in the order of the module doc."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    run = read_metrics(run_dir / METRICS_NAME)
    config = _read_config(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, permissions
        raise OSError(f"cannot make the output folder {out_dir} ({type(e).__name__}: {e}); pass another --out"
                      ) from None
    name = run_dir.resolve().name
    written = [_plot_loss(run, config, out_dir / "loss.png", name)]
    written.append(_plot_step_series(run, "lr", "learning rate", f"{name}: learning rate", out_dir / "lr.png"))
    written.append(_plot_step_series(run, "samples_per_s", "samples / s", f"{name}: training throughput",
                                     out_dir / "samples_per_s.png"))
    if run.evals:
        written.append(_plot_accuracy(run, out_dir / "accuracy.png", name))
    return [p for p in written if p is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PNG plots of a train.py run's metrics.jsonl.")
    parser.add_argument("run_dir", type=Path, help="run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help=f"output folder (default RUN_DIR/{PLOTS_DIR})")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            paths = plot_run(args.run_dir, args.out)
        except (OSError, ValueError, RuntimeError) as exc:  # a missing run, an unwritable --out, a full disk
            print(f"plot_metrics: error: {exc}", file=sys.stderr)
            return 2  # a usage mistake, as argparse's
        finally:
            for w in caught:
                print(f"plot_metrics: warning: {w.message}", file=sys.stderr)
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
