"""Tests for tools/make_demo_data.py: the digits split and images, the photo crops, the idempotent CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.make_demo_data import main, make_digits, make_photos


def jpegs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


def test_make_digits_split_and_images(tmp_path: Path):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    counts = make_digits(out, size=24, val_fraction=0.2, seed=0)

    train, val = jpegs(out / "train"), jpegs(out / "val")
    assert len(train) + len(val) == 1797
    assert counts["train"] == len(train) and counts["val"] == len(val)
    assert sorted(p.name for p in (out / "train").iterdir()) == [str(d) for d in range(10)]
    assert sorted(p.name for p in (out / "val").iterdir()) == [str(d) for d in range(10)]
    for digit in range(10):
        n_train = len(jpegs(out / "train" / str(digit)))
        n_val = len(jpegs(out / "val" / str(digit)))
        assert abs(n_val - 0.2 * (n_train + n_val)) <= 0.5 + 1e-9
    # Every dataset index appears exactly once, in the folder of its label.
    digits = load_digits()
    seen = {int(p.stem): int(p.parent.name) for p in train + val}
    assert sorted(seen) == list(range(1797))
    assert all(digits.target[i] == label for i, label in seen.items())

    for path in train[::50] + val[::50]:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (24, 24)
            assert not img.info.get("progressive")

    # The picture is the digit: shrunk back to 8x8 it correlates with the source bitmap.
    for path in (train[0], val[-1]):
        with Image.open(path) as img:
            small = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
        assert np.corrcoef(small.ravel(), digits.images[int(path.stem)].ravel())[0, 1] > 0.9


def test_make_digits_deterministic_and_refuses_nonempty(tmp_path: Path):
    make_digits(tmp_path / "a", size=8, seed=3)
    make_digits(tmp_path / "b", size=8, seed=3)
    names = lambda root: sorted(str(p.relative_to(root)) for p in jpegs(root))
    assert names(tmp_path / "a") == names(tmp_path / "b")
    with pytest.raises(FileExistsError, match=str(tmp_path / "a")):
        make_digits(tmp_path / "a", size=8)


def test_make_photos_sizes(tmp_path: Path):
    counts = make_photos(tmp_path / "photos", n_images=6, seed=0)
    files = jpegs(tmp_path / "photos" / "train")
    assert len(files) == counts["train"] == 6
    assert sorted(p.name for p in files) == [f"{i:05d}.jpg" for i in range(6)]
    assert sum(counts["per_class"].values()) == 6
    for path in files:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size in {(500, 375), (375, 500)}
            img.load()  # decodes fully


def test_make_photos_both_orientations(tmp_path: Path):
    make_photos(tmp_path / "photos", n_images=24, seed=1)
    sizes = set()
    for path in jpegs(tmp_path / "photos"):
        with Image.open(path) as img:
            sizes.add(img.size)
    assert sizes == {(500, 375), (375, 500)}


def test_cli_idempotent_and_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--photos", "6", "--digit-size", "16"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["photos"] == 6 and manifest["settings"]["digit_size"] == 16
    assert manifest["counts"]["digits"]["train"] + manifest["counts"]["digits"]["val"] == 1797
    assert len(jpegs(out / "photos" / "train")) == 6
    capsys.readouterr()

    # Backdate every file: a rewrite would then show up as a fresh mtime, whatever the clock resolution.
    old = 946684800  # 2000-01-01
    files = [p for p in out.rglob("*") if p.is_file()]
    for path in files:
        os.utime(path, (old, old))

    assert main(argv) == 0
    assert "already" in capsys.readouterr().out
    assert all(path.stat().st_mtime == old for path in files)

    assert main([*argv, "--force"]) == 0
    assert "built" in capsys.readouterr().out
    assert all(path.stat().st_mtime > old for path in files if path.exists())
    assert len(jpegs(out / "photos" / "train")) == 6

    # Other settings rebuild without --force, and leave no files from the old build behind.
    assert main(["--out", str(out), "--photos", "3", "--digit-size", "16"]) == 0
    assert len(jpegs(out / "photos" / "train")) == 3
    assert json.loads((out / "manifest.json").read_text())["settings"]["photos"] == 3


def test_cli_does_not_delete_foreign_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    mine = tmp_path / "demo" / "digits" / "train" / "keep.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"not ours")
    assert main(["--out", str(tmp_path / "demo"), "--photos", "2"]) == 2
    assert "--force" in capsys.readouterr().err
    assert mine.exists()


def test_cli_out_that_is_a_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "demo"
    out.write_bytes(b"mine")
    assert main(["--out", str(out), "--photos", "2"]) == 2
    assert capsys.readouterr().err == (f"make_demo_data: error: --out {out} is a file, not a folder; choose a folder "
                                       "(it is made if missing)\n")
    assert out.read_bytes() == b"mine"
