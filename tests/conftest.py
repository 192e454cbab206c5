"""Shared fixtures: small real-image datasets made from scikit-learn's handwritten digits (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_digits(root: Path, per_class: int, size: int = 32, offset: int = 0) -> Path:
    """root/<digit>/<i>.jpg: per_class real digit images per class, upscaled to size x size RGB JPEGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(digits.target == c)[offset:offset + per_class]
        for i in idx:
            img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            img.convert("RGB").save(root / str(c) / f"{i:05d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """100 images, 10 classes, 32 px."""
    return write_digits(tmp_path_factory.mktemp("digits"), per_class=10)
