"""Bad and odd image files in an ImageFolder: each is converted or replaced and reported, never a crash."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.reference import DataError, ReferenceLoader
from pipelines.spec import CropGroup, MultiCropSpec

SPEC = MultiCropSpec(groups=(CropGroup(32, 2, 0.3, 1.0), CropGroup(16, 2, 0.1, 0.3)))


def photo(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_case(path, case: str) -> bool:
    """Writes one odd file; returns whether it holds a usable image."""
    if case == "zero_bytes":
        path.write_bytes(b"")
        return False
    if case == "truncated_jpeg":
        photo(64, 64).save(path, "JPEG")
        path.write_bytes(path.read_bytes()[:200])
        return False
    if case == "text_as_jpg":
        path.write_text("this is not an image")
        return False
    if case == "png_named_jpg":
        photo(48, 40).save(path, "PNG")
    elif case == "cmyk_jpeg":
        photo(48, 40).convert("CMYK").save(path, "JPEG")
    elif case == "grayscale_jpeg":
        photo(48, 40).convert("L").save(path, "JPEG")
    elif case == "rgba_png_named_jpg":
        photo(48, 40).convert("RGBA").save(path, "PNG")
    elif case == "smaller_than_crop":
        photo(5, 7).save(path, "JPEG")
    elif case == "palette_gif_named_jpg":
        photo(40, 40).convert("P").save(path, "GIF")
    else:
        raise ValueError(case)
    return True


CASES = ["zero_bytes", "truncated_jpeg", "text_as_jpg", "png_named_jpg", "cmyk_jpeg", "grayscale_jpeg",
         "rgba_png_named_jpg", "smaller_than_crop", "palette_gif_named_jpg"]


@pytest.mark.parametrize("case", CASES)
def test_each_odd_file(digits_dir, tmp_path, case):
    root = tmp_path / "data"
    shutil.copytree(digits_dir, root)
    odd = root / "4" / "00000_odd.jpg"  # sorts first in its class
    usable = write_case(odd, case)
    loader = ReferenceLoader(SPEC, str(root), batch_size=101, device=torch.device("cpu"), workers=0)
    index = loader.dataset.samples.index((str(odd), 4))
    batches = []
    if usable:
        batches = list(loader)
    else:
        with pytest.warns(UserWarning, match=odd.name):
            batches = list(loader)
    (batch,) = batches
    assert batch.batch_size == 101 and all(torch.isfinite(c).all() for c in batch.crops)
    assert [c.shape[1:] for c in batch.crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    if usable:  # converted to RGB and used as it is
        assert batch.skipped == [] and loader.skipped == set()
        assert index in batch.index.tolist()
    else:  # replaced by the next image, reported by name, counted
        assert len(batch.skipped) == 1 and str(odd) in batch.skipped[0]
        assert len(loader.skipped) == 1
    assert odd.exists()  # the user's file is left alone


def test_huge_image_beyond_the_decompression_limit_is_skipped(digits_dir, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(digits_dir, root)
    huge = root / "2" / "00000_huge.jpg"
    photo(300, 400).save(huge, "JPEG")
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS (a decompression bomb); shrink the limit instead of
    # writing a 180-megapixel file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 400 // 4)
    loader = ReferenceLoader(SPEC, str(root), batch_size=101, device=torch.device("cpu"), workers=0)
    with pytest.warns(UserWarning, match=huge.name):
        (batch,) = list(loader)
    assert len(batch.skipped) == 1 and "DecompressionBomb" in batch.skipped[0]


def test_a_class_of_only_bad_files_fails_clearly(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(20):
        (root / "a" / f"{i:02d}.jpg").write_bytes(b"")
    loader = ReferenceLoader(SPEC, str(root), batch_size=4, device=torch.device("cpu"), workers=0)
    with pytest.raises(DataError, match="could not be decoded"):
        next(iter(loader))


def test_odd_files_through_write_ffcv_and_the_ffcv_pipeline(digits_dir, tmp_path):
    """Every odd case in one folder, plus a huge image: write_ffcv converts or skips-and-reports each, and the
    ffcv pipeline then decodes every written sample (grayscale, CMYK, palette, 5x7 px ...) without a skip."""
    pytest.importorskip("ffcv", reason="SKIPPED: ffcv is not installed (make env installs it)")
    from pipelines.ffcv import FFCVLoader
    from tools.write_ffcv import write_beton

    root = tmp_path / "data"
    shutil.copytree(digits_dir, root)
    usable = {}
    for case in CASES:
        usable[case] = write_case(root / "4" / f"00000_{case}.jpg", case)
    photo(1500, 2600, seed=1).save(root / "7" / "00000_huge.jpg", "JPEG", quality=80)
    meta = write_beton(root, tmp_path / "odd.beton", max_side=256, workers=1, progress=False)
    n_bad = sum(not u for u in usable.values())
    assert meta["counts"]["skipped"] == n_bad and meta["counts"]["written"] == 100 + len(CASES) + 1 - n_bad
    report = (tmp_path / "odd.beton.skipped.txt").read_text()
    assert all((f"00000_{c}.jpg" in report) == (not u) for c, u in usable.items())
    assert meta["counts"]["reencoded_by_reason"].get("too_large") == 1

    loader = FFCVLoader(SPEC, str(tmp_path / "odd.beton"), batch_size=meta["counts"]["written"],
                        device=torch.device("cpu"), workers=1)
    (batch,) = list(loader)
    assert batch.skipped == [] and loader.skipped == set()
    assert sorted(batch.index.tolist()) == list(range(meta["counts"]["written"]))
    assert [tuple(c.shape[1:]) for c in batch.crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(torch.isfinite(c).all() for c in batch.crops)
