"""pipelines/jpeg.py: frame marker and size from the header, against PIL, and malformed headers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.jpeg import PROGRESSIVE_SOF, jpeg_frame


def encode(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,h,w,kw,marker,comps", [
    ("RGB", 375, 500, {}, 0xC0, 3),
    ("RGB", 500, 375, {"progressive": True}, 0xC2, 3),
    ("L", 7, 5, {}, 0xC0, 1),
    ("CMYK", 40, 48, {}, 0xC0, 4),
    ("RGB", 1, 3000, {"exif": b"Exif\x00\x00" + b"\x00" * 2000}, 0xC0, 3),  # a long APP1 segment before the frame
])
def test_frame_matches_pil(mode, h, w, kw, marker, comps):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    data = encode(img, **kw)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (w, h)
    for form in (data, np.frombuffer(data, dtype=np.uint8), bytearray(data), memoryview(data)):
        f = jpeg_frame(form)
        assert (f.marker, f.height, f.width, f.components) == (marker, h, w, comps)
    assert (marker in PROGRESSIVE_SOF) == kw.get("progressive", False)


def test_malformed_headers_give_none():
    data = encode(Image.new("RGB", (20, 10)))
    sof = data.index(b"\xff\xc0")
    assert jpeg_frame(data[:sof + 6]) is None  # cut inside the frame header
    assert jpeg_frame(data[:4]) is None
    assert jpeg_frame(b"") is None
    assert jpeg_frame(b"\x89PNG\r\n\x1a\n" + data) is None
    assert jpeg_frame(data[:2] + b"\x00" + data[3:]) is None  # no marker where one must be
    buf = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buf, "PNG")
    assert jpeg_frame(buf.getvalue()) is None
