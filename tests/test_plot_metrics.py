"""Tests for tools/plot_metrics.py: synthetic metrics.jsonl files in, valid PNGs out; damaged and missing files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from tools.plot_metrics import main, plot_run, read_metrics

K = 30
ITERS_PER_EPOCH = 10


def synthetic_lines(epochs: int = 4, log_every: int = 2, evals: bool = False) -> list[str]:
    """The records train.py writes: a step line every log_every iterations, an epoch line per epoch."""
    rows = []
    for epoch in range(epochs):
        for it in range(epoch * ITERS_PER_EPOCH + log_every, (epoch + 1) * ITERS_PER_EPOCH + 1, log_every):
            rows.append({"epoch": epoch, "iteration": it, "loss": 4.0 - 0.02 * it, "lr": 0.1 + 0.01 * it,
                         "samples_per_s": 100.0 + it})
        rows.append({"event": "epoch", "epoch": epoch, "loss": 3.9 - 0.2 * epoch, "ln_k": math.log(K),
                     "epoch_time_s": 1.5, "iteration": (epoch + 1) * ITERS_PER_EPOCH,
                     "queue_in_use": epoch >= 2, "skipped_images": 0})
        if evals and epoch % 2 == 1:
            rows.append({"event": "knn", "epoch": epoch, "top1": 50.0 + epoch})
            rows.append({"event": "linear", "epoch": epoch, "top1": 60.0 + epoch, "top5": 90.0})
    rows.append({"event": "checkpoint", "iteration": epochs * ITERS_PER_EPOCH, "path": "x"})  # ignored
    return [json.dumps(r) for r in rows]


def make_run(tmp_path: Path, lines: list[str], name: str = "run", config: str | None = None,
             tail: str = "\n") -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines) + tail)
    if config is not None:
        (run / "config.toml").write_text(config)
    return run


def assert_pngs(paths: list[Path], names: list[str]) -> None:
    assert [p.name for p in paths] == names
    for path in paths:
        assert path.parent.name == "plots" and path.stat().st_size > 1000
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 500 and img.size[1] > 300
            img.verify()


def test_plots_written_and_valid(tmp_path):
    run = make_run(tmp_path, synthetic_lines(), config="nmb_prototypes = 30\nfreeze_prototypes_niters = 5\n")
    paths = plot_run(run)
    assert_pngs(paths, ["loss.png", "lr.png", "samples_per_s.png"])
    assert all(p.parent == run / "plots" for p in paths)


def test_accuracy_plot_when_eval_lines_exist(tmp_path):
    run = make_run(tmp_path, synthetic_lines(evals=True))
    assert_pngs(plot_run(run), ["loss.png", "lr.png", "samples_per_s.png", "accuracy.png"])
    metrics = read_metrics(run / "metrics.jsonl")
    assert sorted(metrics.evals) == ["knn", "linear"] and [r["epoch"] for r in metrics.evals["knn"]] == [1, 3]


def test_read_metrics_sorts_kinds_and_keeps_later_duplicates(tmp_path):
    lines = synthetic_lines(epochs=2)
    # a resumed run repeats iterations 12..20 of epoch 1 with other values: the later ones win
    resumed = [json.dumps({"epoch": 1, "iteration": it, "loss": 1.0, "lr": 0.5, "samples_per_s": 9.0})
               for it in range(12, 21, 2)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines + resumed) + "\n")
    metrics = read_metrics(path)
    its = [r["iteration"] for r in metrics.steps]
    assert its == sorted(set(its)) == list(range(2, 21, 2))
    assert all(r["loss"] == 1.0 for r in metrics.steps if r["iteration"] >= 12)
    assert [r["epoch"] for r in metrics.epochs] == [0, 1] and metrics.skipped_lines == []


def test_truncated_last_line_warns_and_plots(tmp_path):
    lines = synthetic_lines()
    run = make_run(tmp_path, lines + ['{"epoch": 3, "iteration": 4'], tail="")  # killed mid-write
    with pytest.warns(UserWarning, match="the last line is not valid JSON"):
        paths = plot_run(run)
    assert_pngs(paths, ["loss.png", "lr.png", "samples_per_s.png"])


def test_resumed_after_truncation_warns_with_line_number(tmp_path):
    lines = synthetic_lines()
    # the truncated line got the first line of the resumed run appended to it
    lines[3] = lines[3][:20] + lines[4]
    run = make_run(tmp_path, lines)
    with pytest.warns(UserWarning, match="line 4 is not valid JSON"):
        assert len(plot_run(run)) == 3
    with pytest.warns(UserWarning):
        assert read_metrics(run / "metrics.jsonl").skipped_lines == [4]


def test_epoch_lines_only_and_non_finite_loss(tmp_path):
    epochs = [line for line in synthetic_lines() if '"event": "epoch"' in line]
    nan_step = json.dumps({"epoch": 0, "iteration": 3, "loss": float("nan"), "lr": 0.1, "samples_per_s": 1.0})
    stop = json.dumps({"event": "non_finite_loss", "iteration": 3, "message": "loss is nan"})
    run = make_run(tmp_path, [nan_step, stop] + epochs)
    assert_pngs(plot_run(run), ["loss.png", "lr.png", "samples_per_s.png"])
    only_epochs = make_run(tmp_path, epochs, name="epochs_only")
    assert_pngs(plot_run(only_epochs), ["loss.png"])  # no step lines: nothing to plot per step


def test_missing_and_empty_metrics_are_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run directory .* does not exist"):
        plot_run(tmp_path / "nope")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl does not exist"):
        plot_run(tmp_path / "empty_run")
    blank = make_run(tmp_path, [], name="blank", tail="")
    with pytest.raises(ValueError, match="no training records"):
        plot_run(blank)
    assert main([str(tmp_path / "empty_run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plot_metrics: error:") and "empty_run" in err
    assert not (tmp_path / "empty_run" / "plots").exists()


def test_cli(tmp_path, capsys):
    run = make_run(tmp_path, synthetic_lines(evals=True) + ["{trunc"], tail="")
    assert main([str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("wrote ") == 4 and "accuracy.png" in captured.out
    assert "plot_metrics: warning:" in captured.err
    out = tmp_path / "elsewhere"
    assert main([str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "loss.png", "lr.png", "samples_per_s.png"]
    # an --out that cannot be a folder: one line naming it, the file left alone
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"mine")
    assert main([str(run), "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"plot_metrics: error: cannot make the output folder {blocker}" in err and "Traceback" not in err
    assert blocker.read_bytes() == b"mine"


def test_a_plot_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    # a full disk (or a folder this user cannot write) while saving: exit 2 and the error, no traceback
    from matplotlib.figure import Figure

    def full_disk(self, path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    run = make_run(tmp_path, synthetic_lines())
    monkeypatch.setattr(Figure, "savefig", full_disk)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "plot_metrics: error: [Errno 28] No space left on device" in err and "loss.png" in err
    assert "Traceback" not in err
