"""Shared fixtures: small real-image datasets made from scikit-learn's handwritten digits (no network)."""

from __future__ import annotations

import builtins
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

try:  # ffcv, imported directly (pytest.importorskip), would set torch's thread count to 1 for the whole session
    from pipelines.ffcv import import_ffcv

    import_ffcv()
except ImportError:
    pass


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 ARGS` from the repository root, one thread per rank, output
    captured. If the ranks hang past `timeout`, SIGTERM lets torchrun stop them (each rank runs in a session of its
    own, so killing torchrun alone would leave them running), then TimeoutExpired is raised."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_torchrun([proc])
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def stop_torchrun(procs: list[subprocess.Popen]) -> None:
    """Stop torchrun launches still running: SIGTERM, which torchrun forwards to its ranks, then SIGKILL for one
    still there after 60 s (its ranks may then outlive it)."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    for proc in running:
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None,
                                reason="ffcv is not installed (make env installs it)")


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2])


# Triton 3.6's interpreter turns a program id into an int through a 1-element array, which numpy 2.4 refuses
# (the GPU machine's Triton; compiled kernels are not affected). make env installs Triton 3.8, where it works.
needs_triton_interpreter = pytest.mark.skipif(_triton_version() < (3, 7), reason="this Triton's interpreter cannot "
                                              "run the kernels under numpy 2 (make env installs Triton 3.8)")


@pytest.fixture
def no_ffcv(monkeypatch) -> None:
    """Make every import of ffcv fail, as on a machine without it."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kw):
        if name == "ffcv" or name.startswith("ffcv."):
            raise ImportError("No module named 'ffcv'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """100 images, 10 classes, 32 px."""
    return write_digits(tmp_path_factory.mktemp("digits"), per_class=10)


def source_photos() -> list[np.ndarray]:
    """Real photographs shipped by scikit-image and scikit-learn (uint8 HxWx3); skips visibly without them."""
    photos = []
    try:
        from skimage import data

        photos += [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(),
                   data.hubble_deep_field()]
    except Exception as e:  # noqa: BLE001 - any failure to load falls through to the other source
        print(f"scikit-image sample photos unavailable ({e})")
    try:
        from sklearn.datasets import load_sample_images

        photos += list(load_sample_images().images)
    except Exception as e:  # noqa: BLE001
        print(f"scikit-learn sample photos unavailable ({e})")
    if len(photos) < 4:
        pytest.skip("SKIPPED: no real photographs available (needs scikit-image or scikit-learn sample images, "
                    "the dev extra)")
    return photos


# (height, width) of the photo_folder images: landscape, portrait, square, wide, and a strip (crop fallback)
PHOTO_SIZES = [(150, 200), (200, 150), (133, 200), (160, 160), (120, 180), (171, 256), (96, 128), (48, 192)]


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """An ImageFolder of 48 real-photo JPEGs in 2 classes, sizes from PHOTO_SIZES (small, so tests stay fast)."""
    root = tmp_path_factory.mktemp("photo_folder")
    src = source_photos()
    for i in range(48):
        h, w = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        d = root / f"class{i % 2}"
        d.mkdir(exist_ok=True)
        # a different crop of the source each time, so no two files are alike
        img = src[i % len(src)]
        y0, x0 = (i * 7) % (img.shape[0] // 4), (i * 13) % (img.shape[1] // 4)
        Image.fromarray(img[y0:, x0:]).convert("RGB").resize((w, h), Image.BICUBIC).save(d / f"{i:03d}.jpg",
                                                                                          quality=90)
    return root


def view_stats(batches, spec) -> dict:
    """Per crop size: [n_views, 10] per-view channel means, stds, mean absolute horizontal differences (sharpness:
    what the blur changes), in normalised units, and colourfulness (mean spread of a pixel's three channels in
    [0, 1] units: zero for a grayscale view)."""
    sizes = spec.crop_sizes
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    out = {}
    for s in sorted(set(sizes)):
        views = torch.cat([c for b in batches for c, cs in zip(b.crops, sizes, strict=True) if cs == s])
        sharp = (views[..., 1:] - views[..., :-1]).abs().mean((2, 3))
        pixels = views * std + mean
        colour = (pixels.amax(1) - pixels.amin(1)).mean((1, 2))[:, None]
        out[s] = torch.cat([views.mean((2, 3)), views.std((2, 3)), sharp, colour], 1)
    return out


def view_z(a: dict, b: dict) -> float:
    """Largest |difference of means| / standard error over every statistic of two view_stats results."""
    return max(((a[s].mean(0) - b[s].mean(0)).abs() / torch.sqrt(a[s].var(0) / len(a[s]) + b[s].var(0) / len(b[s])))
               .max().item() for s in a)


@pytest.fixture
def joins_asked(monkeypatch) -> list[tuple]:
    """The eval tools under WORLD_SIZE=2 with init_distributed replaced by a probe: each call's (device,
    timeout_minutes) is appended to the returned list, then the probe fails as a device error, so main() stops
    there with exit code 2 and the message "probe: no group joined"."""
    from swav_fast.distributed import DeviceError
    from tools import knn_eval

    monkeypatch.setenv("WORLD_SIZE", "2")
    asked = []

    def probe(device, timeout_minutes):
        asked.append((device, timeout_minutes))
        raise DeviceError("probe: no group joined")

    monkeypatch.setattr(knn_eval, "init_distributed", probe)
    return asked
