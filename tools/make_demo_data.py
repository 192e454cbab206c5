"""Build small ImageFolder datasets from real images that installed packages ship (the demo needs no network).

Two datasets come out of this:

* ``digits``: scikit-learn's 1797 handwritten digits, upscaled and saved as RGB JPEGs with a stratified
  train/val split. Small enough to pretrain and kNN-evaluate on a CPU in minutes.
* ``photos``: ImageNet-sized (500x375 / 375x500) JPEG crops of the photographs bundled with scikit-image
  and scikit-learn. Their labels mean nothing; they exist so pipeline benchmarks decode realistic JPEGs.

Usage::

    python tools/make_demo_data.py --out data/demo [--photos 256] [--digit-size 32] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from rich.progress import track

# Bumped whenever the generated content changes, so an old manifest no longer counts as "already built".
FORMAT_VERSION = 1

PHOTO_LANDSCAPE = (500, 375)  # (width, height): the typical ImageNet JPEG size
DIGITS_JPEG_QUALITY = 95
PHOTOS_JPEG_QUALITY = 90

# scikit-image's bundled photographs. Some builds fetch a few of them lazily (pooch); those that fail
# offline are skipped rather than aborting the whole build.
SKIMAGE_COLOR = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
    "colorwheel",
]
SKIMAGE_GRAY = ["camera", "coins", "moon", "horse", "brick", "grass", "gravel"]


def _ensure_empty_dir(path: Path) -> None:
    # Refuse to mix new files into an existing dataset: stale files from other settings would silently
    # become extra training images.
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"{path} already contains files; remove it first (or run the CLI with --force to rebuild)"
        )
    path.mkdir(parents=True, exist_ok=True)


def _to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Any bundled image (bool mask, grayscale, RGB, RGBA) as an HxWx3 uint8 array."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        lo, hi = float(array.min()), float(array.max())
        array = ((array - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def make_digits(out_dir: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write scikit-learn's digits as ``out_dir/{train,val}/<digit>/<idx:05d>.jpg`` (RGB, size x size).

    The split is stratified and deterministic: within each class, ``round(val_fraction * n_class)`` images
    chosen by a seeded permutation go to val. ``idx`` is the image's index in ``load_digits()``.
    Returns ``{"train": n, "val": n, "classes": 10, "per_class": {"train": {...}, "val": {...}}}``.
    """
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size={size}: digits are 8x8, so size must be at least 8")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    out_dir = Path(out_dir)
    _ensure_empty_dir(out_dir)

    digits = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); stretch them to the full byte range.
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    targets = digits.target.astype(int)

    rng = np.random.default_rng(seed)
    split_of = np.empty(len(targets), dtype=object)
    for cls in np.unique(targets):
        idx = np.flatnonzero(targets == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(val_fraction * len(idx)))
        split_of[idx[:n_val]] = "val"
        split_of[idx[n_val:]] = "train"

    per_class: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for i in track(range(len(targets)), description=f"digits {size}x{size}", transient=True):
        split, label = split_of[i], str(targets[i])
        folder = out_dir / split / label
        folder.mkdir(parents=True, exist_ok=True)
        img = (
            Image.fromarray(images[i], mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        )
        img.save(folder / f"{i:05d}.jpg", format="JPEG", quality=DIGITS_JPEG_QUALITY, progressive=False)
        per_class[split][label] = per_class[split].get(label, 0) + 1

    for split in per_class:
        per_class[split] = dict(sorted(per_class[split].items(), key=lambda kv: int(kv[0])))
    return {
        "train": sum(per_class["train"].values()),
        "val": sum(per_class["val"].values()),
        "classes": int(len(np.unique(targets))),
        "per_class": per_class,
    }


def load_photo_sources() -> tuple[dict[str, np.ndarray], list[str]]:
    """The bundled photographs as ``{name: HxWx3 uint8}``, plus the names that were skipped (and why)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sources: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    seen: dict[str, str] = {}

    def add(name: str, load: Callable[[], np.ndarray]) -> None:
        try:
            array = _to_rgb_uint8(np.asarray(load()))
        except Exception as exc:
            # Any failure (a missing file, a lazy fetch with no network) just means one source fewer.
            skipped.append(f"{name} ({type(exc).__name__})")
            return
        # skimage.data.cat() is an alias of chelsea(): identical sources would be indistinguishable classes.
        digest = hashlib.sha1(array.tobytes()).hexdigest()
        if digest in seen:
            skipped.append(f"{name} (same image as {seen[digest]})")
            return
        seen[digest] = name
        sources[name] = array

    for name in SKIMAGE_COLOR + SKIMAGE_GRAY:
        add(name, getattr(skimage.data, name))
    try:
        samples = load_sample_images()
    except Exception as exc:
        skipped.append(f"sklearn sample images ({type(exc).__name__})")
    else:
        for filename, image in zip(samples.filenames, samples.images, strict=True):
            add(Path(filename).stem, lambda image=image: image)
    return sources, skipped


def _random_photo(source: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An ImageNet-like photo: a random 4:3 or 3:4 crop of 30-100% of the source, resized to 500x375/375x500.

    The area is a target: a source of another shape cannot hold every such crop, so it is shrunk to fit.
    """
    height, width = source.shape[:2]
    # ImageNet is mostly landscape; keep a quarter portrait so both orientations reach the pipelines.
    landscape = rng.random() < 0.75
    ratio = (4 / 3 if landscape else 3 / 4) * math.exp(rng.uniform(-0.1, 0.1))  # ratio = width / height
    area = rng.uniform(0.3, 1.0) * width * height
    crop_w, crop_h = math.sqrt(area * ratio), math.sqrt(area / ratio)
    # A source with a different shape cannot hold every requested crop: shrink it, keeping the aspect ratio.
    shrink = min(1.0, width / crop_w, height / crop_h)
    crop_w, crop_h = max(1, int(crop_w * shrink)), max(1, int(crop_h * shrink))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))

    img = Image.fromarray(source[top : top + crop_h, left : left + crop_w])
    out_size = PHOTO_LANDSCAPE if landscape else PHOTO_LANDSCAPE[::-1]
    img = img.resize(out_size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Mild photometric variation so repeated crops of one source do not compress to near-identical files.
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.85, 1.15))
    return img


def make_photos(out_dir: Path, n_images: int = 256, seed: int = 0) -> dict:
    """Write ``n_images`` ImageNet-like JPEGs to ``out_dir/train/<source_name>/<i:05d>.jpg``.

    Sources are used round-robin in a seeded order: each gets ``n_images // n_sources`` images or one more.
    Returns ``{"train": n, "classes": n_sources, "per_class": {...}, "skipped": [...]}``.
    """
    if n_images < 1:
        raise ValueError(f"n_images={n_images} must be at least 1")
    out_dir = Path(out_dir)
    sources, skipped = load_photo_sources()
    if not sources:
        raise RuntimeError(
            "none of the bundled photographs could be loaded (skipped: " + ", ".join(skipped) + "); "
            "check that scikit-image and scikit-learn are installed in this environment"
        )
    _ensure_empty_dir(out_dir)

    rng = np.random.default_rng(seed)
    names = list(sources)
    order = [names[j] for j in rng.permutation(len(names))]
    per_class: dict[str, int] = {}
    for i in track(range(n_images), description="photos 500x375", transient=True):
        name = order[i % len(order)]
        folder = out_dir / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        _random_photo(sources[name], rng).save(
            folder / f"{i:05d}.jpg", format="JPEG", quality=PHOTOS_JPEG_QUALITY, progressive=False
        )
        per_class[name] = per_class.get(name, 0) + 1

    return {
        "train": n_images,
        "classes": len(per_class),
        "per_class": dict(sorted(per_class.items())),
        "skipped": skipped,
    }


def _count_jpegs(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.jpg")) if folder.is_dir() else 0


def _is_built(out: Path, settings: dict) -> bool:
    """True when ``out/manifest.json`` has these settings and every file it lists is still on disk."""
    manifest_path = out / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("settings") != settings:
        return False
    counts = manifest.get("counts", {})
    try:
        expected = {
            out / "digits" / "train": counts["digits"]["train"],
            out / "digits" / "val": counts["digits"]["val"],
            out / "photos" / "train": counts["photos"]["train"],
        }
    except (KeyError, TypeError):
        return False
    return all(_count_jpegs(folder) == n for folder, n in expected.items())


def build(out: Path, photos: int = 256, digit_size: int = 32, seed: int = 0, force: bool = False) -> dict:
    """Build ``out/digits``, ``out/photos`` and ``out/manifest.json``; a no-op when they already match.

    Returns the manifest, with ``"rebuilt": False`` added when nothing had to be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder; choose a folder (it is made if missing)")
    settings = {
        "format_version": FORMAT_VERSION,
        "digit_size": digit_size,
        "val_fraction": 0.2,
        "photos": photos,
        "seed": seed,
    }
    manifest_path = out / "manifest.json"
    if not force and _is_built(out, settings):
        return {**json.loads(manifest_path.read_text()), "rebuilt": False}

    digits_dir, photos_dir = out / "digits", out / "photos"
    if not force and not manifest_path.exists():
        # Without our manifest these folders may hold someone's own data: never delete them implicitly.
        for folder in (digits_dir, photos_dir):
            if folder.exists() and any(folder.iterdir()):
                raise FileExistsError(
                    f"{folder} exists but {manifest_path} does not, so it was not made by this tool; "
                    "move it away or pass --force to replace it"
                )
    # Drop the manifest first so an interrupted rebuild is never mistaken for a finished one.
    manifest_path.unlink(missing_ok=True)
    for folder in (digits_dir, photos_dir):
        if folder.exists():
            shutil.rmtree(folder)

    digits_counts = make_digits(digits_dir, size=digit_size, val_fraction=settings["val_fraction"], seed=seed)
    photos_counts = make_photos(photos_dir, n_images=photos, seed=seed)
    manifest = {
        "settings": settings,
        "counts": {"digits": digits_counts, "photos": photos_counts},
        "paths": {
            "digits_train": str(digits_dir / "train"),
            "digits_val": str(digits_dir / "val"),
            "photos_train": str(photos_dir / "train"),
        },
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(manifest_path)
    return {**manifest, "rebuilt": True}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the offline demo datasets: digits (pretraining, kNN), photos (pipeline speed)."
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/demo")
    parser.add_argument("--photos", type=int, default=256, help="number of 500x375 photo JPEGs (default 256)")
    parser.add_argument(
        "--digit-size", type=int, default=32, help="side of the digit images in pixels (default 32)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the split and the photo crops (default 0)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the data is already there")
    args = parser.parse_args(argv)
    if args.photos < 1:
        parser.error(f"--photos {args.photos}: need at least 1 photo")
    if args.digit_size < 8:
        parser.error(f"--digit-size {args.digit_size}: digits are 8x8, use 8 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = build(
            args.out, photos=args.photos, digit_size=args.digit_size, seed=args.seed, force=args.force
        )
    except (FileExistsError, NotADirectoryError, RuntimeError, ValueError) as exc:
        print(f"make_demo_data: error: {exc}", file=sys.stderr)
        return 2  # a usage mistake, as argparse's
    except OSError as exc:  # permissions, a full disk
        print(f"make_demo_data: error: cannot write in --out {args.out} ({type(exc).__name__}: {exc}); choose a "
              "folder this user can write, with free space", file=sys.stderr)
        return 2
    digits, photos, paths = manifest["counts"]["digits"], manifest["counts"]["photos"], manifest["paths"]
    if not manifest["rebuilt"]:
        print(f"demo data already in {args.out} with these settings (pass --force to rebuild)")
    else:
        print(f"built demo data in {args.out} in {time.perf_counter() - start:.1f}s")
    print(
        f"  digits train: {digits['train']:5d} images, {digits['classes']} classes -> {paths['digits_train']}"
    )
    print(f"  digits val:   {digits['val']:5d} images, {digits['classes']} classes -> {paths['digits_val']}")
    print(
        f"  photos train: {photos['train']:5d} images, {photos['classes']} sources -> {paths['photos_train']}"
    )
    if manifest["rebuilt"] and photos.get("skipped"):
        print("  photo sources skipped: " + ", ".join(photos["skipped"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
