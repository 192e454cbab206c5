"""JPEG header parsing without decoding: the frame (SOF) marker and the image size, in microseconds.

Used on the host where every sample's header is read each step (pipelines/dali.py) and by tools/write_ffcv.py
to tell baseline from progressive files. Accepts bytes, bytearray, memoryview or a uint8 numpy array.
"""

from __future__ import annotations

from typing import NamedTuple

# JPEG start-of-frame markers: C0 baseline; C1 extended sequential; C2 progressive; C3 lossless; C5-C7
# differential; C9-CB, CD-CF arithmetic coding. C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


class JpegFrame(NamedTuple):
    marker: int
    height: int
    width: int
    components: int


def jpeg_frame(data) -> JpegFrame | None:
    """The first frame header of a JPEG, None if `data` does not start with a well-formed JPEG header up to it."""
    mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    if len(mv) < 2 or mv[0] != 0xFF or mv[1] != 0xD8:
        return None
    pos, n = 2, len(mv)
    while pos + 4 <= n:
        if mv[pos] != 0xFF:
            return None  # a marker must start here; anything else is not a well-formed header
        marker = mv[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers, no length
            pos += 2
            continue
        if marker in SOF_MARKERS:
            if pos + 10 > n:
                return None
            return JpegFrame(marker, (mv[pos + 5] << 8) | mv[pos + 6], (mv[pos + 7] << 8) | mv[pos + 8], mv[pos + 9])
        if marker in (0xDA, 0xD9):  # start of scan / end of image before any frame header
            return None
        pos += 2 + ((mv[pos + 2] << 8) | mv[pos + 3])
    return None
