"""Write an ImageFolder (or a CSV of ``path,label`` lines) to an FFCV ``.beton`` of raw JPEG bytes.

Each sample holds three fields, in this order:

* ``image`` (ffcv ``BytesField``): the bytes of a baseline JPEG file, RGB or grayscale. Not ffcv's
  RGBImageField: pipelines/ffcv.py decodes these bytes itself, in batches, with
  ``torchvision.io.decode_jpeg(..., mode=ImageReadMode.RGB, device="cuda")`` (nvJPEG). Read them with
  ``ImageReadMode.RGB`` so grayscale files come out as 3 channels. Rows of ffcv's ``BytesDecoder`` are padded
  to the longest sample (and the padding is stale memory), so a row must be cut to its length
  (``Reader.metadata[...]['size']``): :func:`read_beton_bytes` does that.
* ``label`` (``IntField``): the class index (ImageFolder: sorted class folder names, as torchvision).
* ``index`` (``IntField``): the sample's position in this file, 0..written-1 (valid images in source order).

What is stored for each valid image:

* the **original file, byte for byte**, when it is a baseline (SOF0) JPEG in RGB or grayscale whose long side
  is at most ``max_side`` (and whose size is not inflated by metadata beyond 3 bytes per pixel + 1 MiB);
* otherwise a **re-encoded** baseline JPEG: PIL decode -> ``convert("RGB")`` (exactly what the reference
  pipeline does: alpha dropped, palette expanded, PIL's CMYK conversion) -> resize so the long side is at
  most ``max_side`` (PIL LANCZOS, antialiased; the long side becomes exactly ``max_side``, the short side is
  rounded) -> JPEG at ``quality`` (4:2:0, not progressive, no EXIF/ICC). Reasons, counted in the sidecar:
  ``too_large``, ``progressive``, ``non_baseline`` (other JPEG processes, or markers we cannot parse),
  ``format:<PIL format>`` (PNG, WEBP, MPO, ...), ``mode:<PIL mode>`` (CMYK, ...), ``oversized_file``.
  The first applicable reason in that order of checks: format, mode, progressive/non_baseline, too_large,
  oversized_file.

``max_side`` defaults to 512: ImageNet's typical 500x375 JPEGs are kept untouched and the rare huge ones
(up to several thousand pixels) are shrunk, so the file stays about the size of the JPEG folder while
224-px RandomResizedCrops at scale up to 1 still see more pixels than they output (ffcv-imagenet uses 500-512
for the same reason). EXIF orientation is never applied, neither here nor by the reference pipeline.

Two passes, both parallel over ``workers`` processes:

1. validation (multiprocessing Pool, rich progress): read each file and fully decode it with PIL
   (``Image.open(...).load()``: catches zero-byte, truncated and non-image files; ``verify()`` does not
   catch truncated JPEG data, so a full decode it is), and decide keep / re-encode. Unreadable files go to
   ``<out>.skipped.txt`` (``path<TAB>reason``) and are counted, never written.
2. writing (ffcv ``DatasetWriter`` with ``num_workers``, a rich progress bar in place of ffcv's tqdm bar): the
   re-encoding happens in its workers, in the dataset's ``__getitem__``. A file that changes or fails between
   the passes (its CRC is checked) aborts the run with an error naming it: an exception inside an ffcv worker
   would otherwise hang the writer, so ``__getitem__`` never raises; it records the failure and writes a
   placeholder, and the result is then discarded.

The ``.beton`` is written under a temporary name in the output folder and renamed at the very end, after its
sidecars (``<out>.json``, ``<out>.skipped.txt``); an existing output is replaced only with ``--force``.

Reading back: :func:`read_beton_bytes` streams every sample through ffcv's Loader; :class:`BetonImages` is a
map-style dataset of ``(PIL RGB image, label)`` that memory-maps the file and cuts each sample's bytes out of
it on demand (tools/linear_eval.py and tools/knn_eval.py read ``--train``/``--val`` .beton files with it);
:func:`open_beton` checks that a file is a write_ffcv ``.beton``.

Usage::

    python tools/write_ffcv.py data/demo/photos/train data/demo/photos_train.beton [--max-side 512]
        [--quality 90] [--workers N] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import threading
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

if __package__ in (None, ""):  # run as `python tools/write_ffcv.py`: make `pipelines` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.ffcv import HOW_TO_WRITE as _HOW_TO_WRITE  # noqa: E402
from pipelines.ffcv import import_ffcv, open_beton  # noqa: E402,F401 - re-exported: the tools open .beton files through it
from pipelines.jpeg import PROGRESSIVE_SOF, jpeg_frame  # noqa: E402
from pipelines.reference import DataError, scan_image_folder  # noqa: E402

DEFAULT_MAX_SIDE = 512
DEFAULT_QUALITY = 90
FORMAT = "swav_fast.write_ffcv/1"
FIELD_SCHEMA = [
    {"name": "image", "ffcv_field": "BytesField",
     "content": "JPEG file bytes: baseline, RGB or grayscale, long side <= max_side; decode with "
                "torchvision.io.decode_jpeg(mode=ImageReadMode.RGB)"},
    {"name": "label", "ffcv_field": "IntField", "content": "class index (see classes)"},
    {"name": "index", "ffcv_field": "IntField", "content": "position of the sample in this file, 0..written-1"},
]
# A kept original may carry metadata (EXIF, ICC, XMP) beyond its pixels' worth only up to this much.
KEEP_EXTRA_BYTES = 1 << 20
MIN_PAGE_SIZE = 1 << 23  # ffcv's default page size (8 MiB)
RESAMPLE = Image.Resampling.LANCZOS


# ----------------------------------------------------------------------------------------------- inspection
def jpeg_sof_marker(data: bytes) -> int | None:
    """The start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...) of a JPEG, None if not found."""
    frame = jpeg_frame(data)
    return frame.marker if frame is not None else None


def resized_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) with the long side at most max_side: the long side becomes max_side, the short one is rounded."""
    long_side = max(width, height)
    if long_side <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _reencode_reason(data: bytes, fmt: str | None, mode: str, width: int, height: int, max_side: int) -> str | None:
    if fmt != "JPEG":
        return f"format:{fmt or 'unknown'}"
    if mode not in ("RGB", "L"):
        return f"mode:{mode}"
    sof = jpeg_sof_marker(data)
    if sof in PROGRESSIVE_SOF:
        return "progressive"
    if sof != 0xC0:
        return "non_baseline"
    if max(width, height) > max_side:
        return "too_large"
    if len(data) > 3 * width * height + KEEP_EXTRA_BYTES:
        return "oversized_file"
    return None


def inspect_image(path: str, max_side: int) -> tuple[str, str | None, int]:
    """("skip", reason, 0) for a file that cannot be used, else ("keep" | "reencode", reason, crc32 of the file).

    Runs in the validation pool: reads the file and decodes it completely with PIL.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "skip", "file not found", 0
    except OSError as exc:
        return "skip", _one_line(f"unreadable ({type(exc).__name__}: {exc})"), 0
    if not data:
        return "skip", "empty file (0 bytes)", 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette-transparency and decompression-bomb warnings
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode, (width, height) = im.format, im.mode, im.size
                im.load()
    except UnidentifiedImageError:
        return "skip", "not an image (PIL cannot identify it)", 0
    except Exception as exc:  # noqa: BLE001 - any decoder failure means: not usable
        msg = str(exc)
        kind = "truncated" if "truncated" in msg else "undecodable"
        return "skip", _one_line(f"{kind} ({type(exc).__name__}: {msg})"), 0
    if width < 1 or height < 1:
        return "skip", f"empty image ({width}x{height})", 0
    reason = _reencode_reason(data, fmt, mode, width, height, max_side)
    return ("keep" if reason is None else "reencode"), reason, zlib.crc32(data)


def reencode_jpeg(data: bytes, max_side: int, quality: int) -> bytes:
    """PIL decode -> RGB -> long side <= max_side (LANCZOS) -> baseline JPEG at quality."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    size = resized_size(rgb.width, rgb.height, max_side)
    if size != rgb.size:
        rgb = rgb.resize(size, RESAMPLE)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality, progressive=False, optimize=False)
    return buf.getvalue()


def stored_bytes(data: bytes, max_side: int = DEFAULT_MAX_SIDE, quality: int = DEFAULT_QUALITY) -> bytes:
    """The bytes write_beton stores for an image file PIL can open: the file itself, or its re-encoding (another
    format or mode, progressive, long side above max_side, oversized). Raises what PIL raises for other files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (width, height) = im.format, im.mode, im.size
    reason = _reencode_reason(data, fmt, mode, width, height, max_side)
    return data if reason is None else reencode_jpeg(data, max_side, quality)


def _placeholder_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "JPEG", quality=75)
    return buf.getvalue()


class _PreparedImages:
    """The indexable dataset ffcv's DatasetWriter reads from, in its worker processes.

    ``__getitem__`` never raises (an exception would kill an ffcv worker and hang the writer): a failure is
    appended to ``failure_log`` and a placeholder written; write_beton then discards the file.
    """

    def __init__(self, plans: list[tuple[str, int, str | None, int]], max_side: int, quality: int,
                 max_payload: int, failure_log: str):
        self.plans, self.max_side, self.quality = plans, max_side, quality
        self.max_payload, self.failure_log = max_payload, failure_log

    def __len__(self) -> int:
        return len(self.plans)

    def _payload(self, path: str, reason: str | None, crc: int) -> bytes:
        with open(path, "rb") as f:
            data = f.read()
        if zlib.crc32(data) != crc:
            raise DataError("file changed between the validation and the writing pass")
        payload = data if reason is None else reencode_jpeg(data, self.max_side, self.quality)
        if not 0 < len(payload) <= self.max_payload:
            raise DataError(f"encoded size {len(payload)} bytes does not fit an ffcv page ({self.max_payload})")
        return payload

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        path, label, reason, crc = self.plans[i]
        try:
            payload = self._payload(path, reason, crc)
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            with open(self.failure_log, "a") as f:
                f.write(f"{path}\t{_one_line(f'{type(exc).__name__}: {exc}')}\n")
            payload = _placeholder_jpeg()
        return np.frombuffer(payload, dtype=np.uint8), label, i


class OutputExists(FileExistsError):
    """write_beton's output exists and ``force`` is off; nothing was touched. ``str()`` says what to do from Python
    (``force=True``); :meth:`message` words it for another caller (the CLI passes ``"--force"``)."""

    def __init__(self, out: Path, appeared: bool = False):
        self.out, self.appeared = out, appeared
        super().__init__(self.message("force=True"))

    def message(self, force: str) -> str:
        what = "appeared while writing" if self.appeared else "already exists"
        return f"output '{self.out}' {what}; it was left untouched (pass {force} to overwrite it)"


class WorkerDied(DataError):
    """An ffcv writer process ended before its work was done (killed, out of memory, or an uncaught error)."""


@contextlib.contextmanager
def _watch_ffcv_workers(poll_s: float = 0.5):
    """Turn a dead ffcv writer worker into WorkerDied instead of a hang.

    ffcv's DatasetWriter polls a shared counter until every sample is written; if a worker process dies (the
    kernel's OOM killer, a signal, an error ffcv does not catch), the counter stops and it waits forever. Here
    the Process class ffcv uses is wrapped to record the workers, and a thread sends SIGINT to the main thread
    as soon as one of them has exited with a non-zero code; the other workers are then stopped. Python's own
    SIGINT handler (KeyboardInterrupt) is put back for the block where SIGINT was ignored (a background job of a
    script ignores it), so that the signal is not lost; called outside the main thread, that cannot be done.
    """
    import ffcv.writer

    workers: list = []
    real_process = ffcv.writer.Process

    def recording_process(*args, **kwargs):
        proc = real_process(*args, **kwargs)
        workers.append(proc)
        return proc

    dead: list[int] = []
    stop, lock = threading.Event(), threading.Lock()

    def watch() -> None:
        while not stop.wait(poll_s):
            bad = [w.exitcode for w in list(workers) if w.exitcode not in (None, 0)]
            with lock:  # never signals once the main thread has left the block
                if bad and not stop.is_set():
                    dead.append(bad[0])
                    # a real SIGINT aimed at the main thread: it also wakes a blocking read (ffcv's queue.get)
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    return

    ffcv.writer.Process = recording_process
    ignored = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=watch, name="ffcv-worker-watch", daemon=True)
    thread.start()
    try:
        yield
    except KeyboardInterrupt:
        if not dead:
            raise  # a real Ctrl-C
        code = dead[0]
        how = (f"was killed by signal {-code}" + (" (SIGKILL: often the out-of-memory killer; try fewer --workers)"
                                                   if code == -9 else "")) if code < 0 else f"exited with code {code}"
        raise WorkerDied(f"an ffcv writer process {how}; the other workers were stopped") from None
    finally:
        with lock:
            stop.set()
        thread.join()
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        ffcv.writer.Process = real_process
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join(timeout=10)


# ---------------------------------------------------------------------------------------------------- input
def read_csv_list(csv_path: str | Path) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, label) rows of a ``path,label`` CSV and the class map.

    Relative paths are resolved against the CSV's folder. Labels that are all integers (>= 0) are used as
    they are (classes: "3" -> 3); otherwise labels are class names, numbered in sorted order. An optional
    header ``path,label``, blank lines and lines starting with ``#`` are ignored.
    """
    csv_path = Path(csv_path)
    base = csv_path.resolve().parent
    rows: list[tuple[str, str]] = []
    with open(csv_path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if not rows and [c.lower() for c in cells] == ["path", "label"]:
                continue
            if len(cells) != 2 or not cells[0] or not cells[1]:
                raise DataError(f"{csv_path}:{lineno}: expected 'path,label', got {row!r}")
            p = Path(cells[0])
            rows.append((str(p if p.is_absolute() else base / p), cells[1]))
    if not rows:
        raise DataError(f"CSV list '{csv_path}' has no 'path,label' lines")
    labels = [lab for _, lab in rows]
    try:
        ints = [int(lab) for lab in labels]
    except ValueError:
        ints = None
    if ints is not None:
        if min(ints) < 0:
            raise DataError(f"CSV list '{csv_path}': integer labels must be >= 0 (found {min(ints)})")
        classes = {str(c): c for c in sorted(set(ints))}
        return [(p, c) for (p, _), c in zip(rows, ints, strict=True)], classes
    classes = {name: i for i, name in enumerate(sorted(set(labels)))}
    return [(p, classes[lab]) for p, lab in rows], classes


def read_source(source: str | Path) -> tuple[list[tuple[str, int]], dict[str, int], str]:
    """(samples, classes, kind) of an ImageFolder root or a CSV list."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"source '{source}' does not exist: pass an ImageFolder root (one sub-folder of images "
                        "per class) or a CSV file of 'path,label' lines")
    if source.is_dir():
        samples, names = scan_image_folder(source)
        return samples, {name: i for i, name in enumerate(names)}, "image_folder"
    samples, classes = read_csv_list(source)
    return samples, classes, "csv"


# --------------------------------------------------------------------------------------------------- output
def sidecar_paths(out: str | Path) -> tuple[Path, Path]:
    """(<out>.json, <out>.skipped.txt)."""
    return Path(f"{out}.json"), Path(f"{out}.skipped.txt")


def page_size_for(max_side: int) -> int:
    """An ffcv page size (power of two >= 8 MiB) that holds any sample at least twice."""
    bound = 3 * max_side * max_side + KEEP_EXTRA_BYTES
    page = MIN_PAGE_SIZE
    while page < 2 * bound:
        page *= 2
    return page


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _progress_columns(label: str) -> tuple:
    return TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()


@contextlib.contextmanager
def _rich_ffcv_progress(enabled: bool):
    """ffcv's DatasetWriter draws its own tqdm bar (and draws it even when progress is off); inside this block
    it draws a rich "writing" bar like the validation's, or none. ffcv only calls tqdm(total=), update, close."""
    import ffcv.writer

    class Bar:
        def __init__(self, total: int, **_):
            self._bar = Progress(*_progress_columns("writing"), console=Console(stderr=True), disable=not enabled)
            self._task = self._bar.add_task("writing", total=total)
            self._bar.start()

        def update(self, n: int = 1) -> None:
            self._bar.advance(self._task, n)

        def close(self) -> None:
            self._bar.stop()

    real = ffcv.writer.tqdm
    ffcv.writer.tqdm = Bar
    try:
        yield
    finally:
        ffcv.writer.tqdm = real


def _validate(paths: list[str], max_side: int, workers: int, progress: bool) -> list[tuple[str, str | None, int]]:
    fn = partial(inspect_image, max_side=max_side)
    # The pool forks before rich's refresh thread starts: children only ever run inspect_image.
    pool = Pool(min(workers, len(paths))) if workers > 1 and len(paths) > 1 else None
    try:
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        results_iter = pool.imap(fn, paths, chunksize=chunk) if pool is not None else map(fn, paths)
        results = []
        with Progress(*_progress_columns("validating"), console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("validating", total=len(paths))
            for r in results_iter:
                results.append(r)
                bar.advance(task)
        return results
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def write_beton(source: str | Path, out: str | Path, max_side: int = DEFAULT_MAX_SIDE,
                quality: int = DEFAULT_QUALITY, workers: int | None = None, force: bool = False,
                progress: bool = True) -> dict:
    """Write ``source`` (ImageFolder root or ``path,label`` CSV) to the .beton ``out``; returns the sidecar dict.

    Raises DataError for unusable input (including zero valid images), OutputExists (a FileExistsError) when
    ``out`` exists and ``force`` is False (nothing is touched then), and ImportError (saying how to install it) when
    ffcv is missing, before any image is read.
    """
    if not 8 <= max_side <= 16384:
        raise ValueError(f"max_side must be in [8, 16384], got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    workers = _default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    if out.is_dir():
        raise DataError(f"output '{out}' is a directory: pass the path of the .beton file to write")
    if out.exists() and not force:
        raise OutputExists(out)
    import_ffcv()  # first, so a missing ffcv costs no validation pass; keeps torch's thread count (see there)

    samples, classes, kind = read_source(source)
    results = _validate([p for p, _ in samples], max_side, workers, progress)
    plans, skipped = [], []
    kept, reasons = 0, Counter()
    for (path, label), (action, reason, crc) in zip(samples, results, strict=True):
        if action == "skip":
            skipped.append((path, reason))
            continue
        plans.append((path, label, reason, crc))
        if reason is None:
            kept += 1
        else:
            reasons[reason] += 1
    if not plans:
        shown = "; ".join(f"{p}: {r}" for p, r in skipped[:5])  # CSV paths as resolved (see read_csv_list)
        hint = ""
        if kind == "csv" and any(r == "file not found" for _, r in skipped):
            hint = f"; relative paths in a CSV list are resolved against its folder, {Path(source).resolve().parent}"
        raise DataError(f"no valid images in '{source}': all {len(samples)} files were skipped ({shown}"
                        f"{'; ...' if len(skipped) > 5 else ''}){hint}")

    from ffcv.fields import BytesField, IntField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    failure_log = out.with_name(f".{out.name}.{os.getpid()}.failures")
    page_size = page_size_for(max_side)
    try:
        failure_log.write_text("")
        dataset = _PreparedImages(plans, max_side, quality, page_size // 2, str(failure_log))
        writer = DatasetWriter(str(tmp), {"image": BytesField(), "label": IntField(), "index": IntField()},
                               page_size=page_size, num_workers=min(workers, len(plans)))
        chunk = max(1, min(100, len(plans) // (workers * 4)))
        try:
            with _watch_ffcv_workers(), _rich_ffcv_progress(progress):
                writer.from_indexed_dataset(dataset, chunksize=chunk)
        except WorkerDied as e:
            shm = getattr(writer, "metadata_sm", None)  # ffcv's shared-memory index, freed by ffcv only on success
            if shm is not None:
                with contextlib.suppress(OSError):
                    shm.close()
                    shm.unlink()
            raise WorkerDied(f"{e}; nothing was written to '{out}' (run write_ffcv again)") from None
        failures = failure_log.read_text().splitlines()
        if failures:
            raise DataError(f"{len(failures)} image(s) failed while writing (nothing was written to '{out}'): "
                            + "; ".join(failures[:5]))
        reader = Reader(str(tmp))
        if int(reader.num_samples) != len(plans) or reader.field_names != ["image", "label", "index"]:
            raise RuntimeError(f"ffcv wrote an inconsistent file ({reader.num_samples} samples, fields "
                               f"{reader.field_names}; expected {len(plans)})")

        try:
            ffcv_version = version("ffcv")
        except PackageNotFoundError:
            ffcv_version = "unknown"
        meta_path, report_path = sidecar_paths(out)
        sidecar = {
            "format": FORMAT,
            "counts": {
                "total": len(samples),
                "written": len(plans),
                "kept_original": kept,
                "reencoded": sum(reasons.values()),
                "reencoded_by_reason": dict(sorted(reasons.items())),
                "skipped": len(skipped),
            },
            "classes": classes,
            "settings": {
                "max_side": max_side,
                "quality": quality,
                "resample": "PIL LANCZOS",
                "source": str(Path(source).resolve()),
                "source_kind": kind,
                "page_size": page_size,
                "ffcv_version": ffcv_version,
            },
            "fields": FIELD_SCHEMA,
            "beton": {"file": out.name, "bytes": tmp.stat().st_size, "num_samples": len(plans)},
            "skipped_report": report_path.name,
        }
        if out.exists() and not force:  # appeared while we were working
            raise OutputExists(out, appeared=True)
        _atomic_write_text(report_path, "".join(f"{p}\t{r}\n" for p, r in skipped))
        _atomic_write_text(meta_path, json.dumps(sidecar, indent=2) + "\n")
        os.replace(tmp, out)
        return sidecar
    finally:
        tmp.unlink(missing_ok=True)
        failure_log.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------- reading
def read_beton_bytes(path: str | Path, batch_size: int = 256) -> Iterator[tuple[bytes, int, int]]:
    """(JPEG bytes, label, index) of every sample of a write_beton file, in file order, read on CPU.

    Uses ffcv's Loader (sequential order) with ``BytesDecoder`` / ``IntDecoder``. BytesDecoder returns each
    batch as a uint8 array [B, longest sample in the file] whose rows are not cleared between batches, so each
    row is cut to its sample's length from the file's metadata (``loader.reader.metadata``: one record per
    sample, field i under the name ``f{i}``, a BytesField as (ptr, size)).
    """
    import_ffcv()
    from ffcv.fields.decoders import BytesDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    open_beton(path)  # a clear error for a missing file, a non-.beton or other fields
    loader = Loader(str(path), batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    pipelines={"image": [BytesDecoder()], "label": [IntDecoder()], "index": [IntDecoder()]})
    reader = loader.reader
    sizes = reader.metadata[f"f{reader.field_names.index('image')}"]["size"]
    pos = 0
    for images, labels, indices in loader:
        for j in range(len(labels)):
            yield images[j, :int(sizes[pos])].tobytes(), int(labels[j, 0]), int(indices[j, 0])
            pos += 1


class BetonImages:
    """Map-style dataset over a :func:`write_beton` file: ``(transform(PIL RGB image), label)`` per sample.

    Samples are in file order (the ``index`` field), so a .beton written from an ImageFolder lists its images
    in the order of torchvision's ``ImageFolder`` and with the same labels. The file is memory-mapped (lazily,
    once per process: DataLoader workers each map it themselves) and ``__getitem__`` cuts the sample's JPEG
    bytes out at ``(ptr, size)`` of the image field's record in ffcv's per-sample metadata (``ptr`` is an
    absolute offset in the file), then decodes them as torchvision's ImageFolder loader decodes a file:
    ``PIL.Image.open(...).convert("RGB")``. Only the metadata (4 numbers per sample) is held in memory.

    Attributes: ``path``, ``transform`` (settable, as on ImageFolder), ``targets`` (int64 labels, file order),
    ``classes`` (class names by label from the sidecar ``<file>.json``, or None when it is absent),
    ``num_classes`` (``len(classes)``; without a sidecar ``max(label) + 1``), ``note`` (None, or a line to
    show the user when the class names had to be guessed).
    """

    def __init__(self, path: str | Path, transform=None):
        self.path = Path(path)
        self.transform = transform
        md = open_beton(self.path).metadata
        self.ptrs = np.ascontiguousarray(md["f0"]["ptr"], dtype=np.int64)
        self.sizes = np.ascontiguousarray(md["f0"]["size"], dtype=np.int64)
        self.targets = np.ascontiguousarray(md["f1"], dtype=np.int64)
        index = md["f2"]
        if not np.array_equal(index, np.arange(len(index))):
            raise DataError(f"'{self.path}' has an index field that is not 0..{len(index) - 1} in file order: not "
                            f"a file of tools/write_ffcv.py; {_HOW_TO_WRITE}")
        if len(self.targets) and self.targets.min() < 0:
            raise DataError(f"'{self.path}' has negative labels: not a file of tools/write_ffcv.py")
        self.classes, self.note = self._read_classes()
        self.num_classes = len(self.classes) if self.classes is not None else int(self.targets.max(initial=-1)) + 1
        self._map: np.memmap | None = None

    def _read_classes(self) -> tuple[list[str] | None, str | None]:
        meta_path, _ = sidecar_paths(self.path)
        top = int(self.targets.max(initial=-1))
        if not meta_path.is_file():
            return None, (f"{self.path} has no sidecar {meta_path.name}: class names unknown, {top + 1} classes "
                          "taken from the largest label + 1")
        try:
            meta = json.loads(meta_path.read_text())
            mapping = meta["classes"]
            by_label = {int(v): str(k) for k, v in mapping.items()}
            written = int(meta["beton"]["num_samples"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"sidecar '{meta_path}' cannot be read as the <file>.json of tools/write_ffcv.py "
                            f"({_one_line(f'{type(exc).__name__}: {exc}')}); write the .beton again with "
                            "tools/write_ffcv.py, or remove the sidecar") from exc
        # ImageFolder sources number their classes 0..n-1; integer CSV labels may leave gaps, named by number
        n = max(by_label, default=-1) + 1
        if written != len(self.targets) or len(by_label) != len(mapping) or min(by_label, default=0) < 0 or top >= n:
            raise DataError(f"sidecar '{meta_path}' does not describe '{self.path}' ({written} samples, "
                            f"{len(mapping)} classes; the file has {len(self.targets)} samples, labels up to "
                            f"{top}); write the .beton again with tools/write_ffcv.py")
        return [by_label.get(i, str(i)) for i in range(n)], None

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self) -> dict:  # never pickle the mapping (spawned workers map the file themselves)
        return {**self.__dict__, "_map": None}

    def read_bytes(self, i: int) -> bytes:
        """The stored JPEG bytes of sample ``i``."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        ptr, size = int(self.ptrs[i]), int(self.sizes[i])
        return self._map[ptr:ptr + size].tobytes()

    def __getitem__(self, i: int):
        with Image.open(io.BytesIO(self.read_bytes(i))) as im:
            image = im.convert("RGB")
        return (image if self.transform is None else self.transform(image)), int(self.targets[i])


# ------------------------------------------------------------------------------------------------------- CLI
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write an ImageFolder or a 'path,label' CSV to an FFCV .beton of raw JPEG bytes "
                    "(fields image/label/index), with <out>.json and <out>.skipped.txt beside it.")
    parser.add_argument("source", help="ImageFolder root (one sub-folder per class) or CSV of path,label lines "
                                       "(relative paths in it are resolved against the CSV's folder, not the "
                                       "current directory)")
    parser.add_argument("out", help="the .beton file to write")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                        help=f"longest image side stored; larger images are resized (default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                        help=f"JPEG quality of re-encoded images (default {DEFAULT_QUALITY})")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all usable CPU cores)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    # checked here as well as in write_beton, so that the message names the flag
    if not 8 <= args.max_side <= 16384:
        parser.error(f"--max-side {args.max_side}: must be in 8..16384")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality {args.quality}: must be in 1..100")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    err = Console(stderr=True)
    start = time.perf_counter()
    try:
        meta = write_beton(args.source, args.out, max_side=args.max_side, quality=args.quality,
                           workers=args.workers, force=args.force)
    except (DataError, FileExistsError, ValueError, ImportError) as exc:
        text = exc.message("--force") if isinstance(exc, OutputExists) else str(exc)
        err.print(f"[red]error:[/red] {text}", highlight=False, soft_wrap=True)
        return 2
    c = meta["counts"]
    by_reason = ", ".join(f"{k} {v}" for k, v in c["reencoded_by_reason"].items())
    _, report = sidecar_paths(args.out)
    print(f"wrote {c['written']} images ({meta['beton']['bytes'] / 2**20:.1f} MiB) to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"  kept byte-for-byte: {c['kept_original']}; re-encoded: {c['reencoded']}"
          + (f" ({by_reason})" if by_reason else ""))
    print(f"  skipped: {c['skipped']}" + (f" (listed in {report})" if c["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
