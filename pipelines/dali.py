"""NVIDIA DALI multi-crop pipeline: JPEG decode and every crop/colour op inside one DALI graph, on the GPU.

What it does, per step: the host (this module, in the training process, in background threads: a few steps ahead of the
one DALI asks for, so that the training thread only picks up finished steps) takes the step's image indices (the same
DistributedSampler order as pipelines/reference.py: shuffled with (seed, epoch), padded to a multiple of the world size,
one strided shard per rank, whole batches, drop_last), reads each file's encoded bytes (in parallel: `workers` threads,
one file per task), peeks its size from the header (pipelines/jpeg.py for a JPEG, PIL's header read otherwise; no
decode) and draws every augmentation parameter with `GPUMultiCrop.sample_params` from pipelines/gpu_augment.py, using
`augment_generator(seed, epoch, rank, step)` (the reference's distributions: torchvision's RandomResizedCrop rule, flip,
jitter, grayscale and blur probabilities, jitter factors, blur sigma). The bytes and, per crop, one small float vector
per image are fed to a DALI pipeline through `fn.external_source`; DALI decodes (`fn.decoders.image`, device "mixed" =
nvJPEG on the GPU, or "cpu") and, per crop: `fn.resize` of the crop box (ROI) to size x size (linear, antialiased) -> if
the jitter was drawn: brightness (`fn.brightness_contrast`), contrast (a blend with the per-image mean of the luma
image, DALI arithmetic), saturation (`fn.hsv`), hue (`fn.hsv`) -> if grayscale was drawn: luma in 3 channels
(`fn.color_space_conversion` to GRAY, repeated) -> if blur was drawn: `fn.gaussian_blur` with the image's sigma ->
`fn.crop_mirror_normalize` (the flip, and (x / 255 - mean) / std as float32, HWC). The per-image choices use DALI's
per-sample conditionals (`enable_conditionals`), so an image without jitter, grayscale or blur is passed through
untouched. The HWC float32 batch is copied into a torch tensor [B, S, S, 3] on the target device and handed over as its
[B, 3, S, S] permutation, which is channels_last.

Status: tested on DALI's CPU backend only (tests/test_dali_pipeline.py). The GPU graph is the same graph with the
mixed decoder (jpeg_fancy_upsampling on, to match libjpeg-turbo's chroma upsampling) and the per-image contrast factor
moved to the GPU (`.gpu()`) for the blend; it has not been run on a GPU yet. Its graph is built (without a backend)
and checked here: the CPU graph's operators, each one that DALI implements on its device, images on the GPU and
the parameters as CPU argument inputs.

Determinism: no DALI random op is used (their state cannot be re-seeded per step); the views are a pure function of
(seed, epoch, rank, step) and of the set of unreadable files, so `set_epoch(e, start_step=k)` yields exactly the batches
an uninterrupted epoch would have from step k on. The background threads do not change that: one thread prepares whole
steps, in step order, with the epoch's order and number fixed when they were submitted; the file reads of one step run
in parallel, but a file's replacement and the `skipped` entries depend only on which files are unreadable (a header
check fails the same way whichever thread makes it, and the shared `unreadable` record only caches those results); and
the steps prepared ahead are dropped and prepared again when DALI's decoder is found to reject a file (below), or when
an epoch starts or is abandoned. Note that the views differ from the reference pipeline's for the same seed (different
RNG streams, as in gpu_augment) and between DALI on CPU and on GPU (decoders).

Unreadable images: every file's header is checked on the host (empty file, not an image, broken header, a format
DALI does not decode such as GIF, a JPEG without its end-of-image marker or a PNG without IEND that PIL cannot fully
decode either, i.e. a truncated file). Such a file is replaced by the next readable image in the dataset (as
pipelines/reference.py does, at most MAX_REPLACEMENTS tries), named once in a warning and listed in the batch's
`skipped`. A file that passes these checks but still makes DALI fail (a DALI error invalidates the whole pipeline)
is found by decoding the files of the failed steps in a decode-only pipeline (bisection), marked unreadable, and the
steps are rebuilt and rerun, so an epoch never dies on one bad file. Measured with DALI 2.4's CPU decoder: truncated
JPEGs, empty files, non-images and GIFs make it fail (caught by the header checks); PNG or CMYK JPEG under a .jpg
name, grayscale JPEGs, palette/RGBA PNGs, TIFF, PNM, WebP and 1 x 1 images decode to the same pixels as PIL's
convert("RGB") and are kept (an image smaller than the crop is upsampled, as in the reference). EXIF orientation is
ignored, as PIL's Image.open does.

Deviations from the PIL/torchvision reference chain (pipelines/reference.py), named here as REFERENCE section 6 asks;
the distribution of the random choices is the reference's, individual views are not bit-identical:
- Jitter order: brightness, contrast, saturation, hue, always in this FIXED order (the reference draws a random
  order per crop). The factors and the 0.8 probability are the reference's.
- Hue: `fn.hsv(hue=360 * h degrees)` rotates the chroma in YIQ space (a linear map that keeps luma), not
  torchvision's shift of the HSV hue (which keeps HSV value and saturation): same direction of rotation, but for
  the same factor the colours differ, by ~13-20/255 on average for 30-60 degrees on photos.
- Saturation: `fn.hsv(saturation=s)` scales YIQ chroma, which is PIL's blend with the luma gray up to DALI's
  rounded matrices: within 2/255 of ImageEnhance.Color.
- Contrast: the blend target is the float mean of DALI's 8-bit luma image (PIL: that mean rounded to an integer).
- Grayscale: DALI's RGB -> GRAY conversion (ITU-R 601 luma, 0.299/0.587/0.114 as PIL's convert("L")), within one
  8-bit level of PIL.
- Resampling: DALI's antialiased linear resize of the ROI. Inside the crop it equals torchvision's
  `resized_crop(..., antialias=True)` up to 8-bit rounding (< 0.5 level); on the outermost row/column of output
  pixels DALI's filter also reads the source pixels just outside the crop box (the ROI is not a hard crop; PIL and
  torchvision renormalise over the box), a few levels there, up to ~20 at sharp edges.
- Rounding: every op works on uint8 and rounds, as PIL does (resize, brightness, contrast, saturation, hue, gray,
  blur), but DALI's rounding points and fixed-point details differ from PIL's: ~0.5 level per op.
- Gaussian blur: a sampled Gaussian (`fn.gaussian_blur`) with 2 * ceil(4 * sigma) + 1 taps per image (gpu_augment's
  truncation; DALI's default would be 3 sigma), not PIL's three box blurs of the same variance; sigma is in output
  pixels for every crop size, as in the reference. DALI mirrors the image at its border (PIL replicates the edge
  pixels): interior ~0.5/255 mean difference from PIL GaussianBlur(radius=sigma), more on the outer 4 sigma.
- Flip: applied at the end (`crop_mirror_normalize`), which equals flipping first because every later op is
  pointwise or mirror-symmetric.
- 16-bit PNGs: DALI scales them to 8 bits (PIL's convert("RGB") clips them); EXIF orientation is ignored by both.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from pipelines.gpu_augment import BRIGHTNESS, CONTRAST, HUE, SATURATION, GPUMultiCrop, augment_generator
from pipelines.jpeg import jpeg_frame
from pipelines.reference import (
    check_start_step,
    read_with_replacement,
    scan_image_folder,
    steps_per_epoch,
)
from pipelines.spec import DataWarning, MultiCropBatch, MultiCropSpec, warn_skipped_once

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError as e:  # one clear line instead of a traceback into an optional dependency
    raise ImportError(f"--pipeline dali needs NVIDIA DALI, which is not importable ({e}): "
                      "pip install nvidia-dali-cuda130 (or `make env`, which installs the dali extra)") from e

# Every DALI pipeline this module builds. A forked child process (e.g. a DataLoader worker of a later evaluation)
# inherits them without their threads; if the child deletes one (garbage collection), DALI's shutdown runs on thread
# state that does not exist there (seen once: a DataLoader worker aborted in Pipeline.__del__ with "Invalid argument";
# not reproducible on demand). So the child detaches its copies from their backend objects,
# which it keeps referenced until it exits (with os._exit, as multiprocessing's children do), so that no DALI
# destructor ever runs there. They are not usable in the child anyway.
_PIPELINES: weakref.WeakSet = weakref.WeakSet()
_DETACHED_IN_CHILD: list = []


def _forget_pipelines_in_child() -> None:
    for pipe in list(_PIPELINES):
        backend = getattr(pipe, "_pipe", None)
        if backend is not None:
            _DETACHED_IN_CHILD.append(backend)
            pipe._pipe = None  # Pipeline.__del__ only shuts down a pipeline whose backend object is set


os.register_at_fork(after_in_child=_forget_pipelines_in_child)


def _built(pipe):
    pipe.build()
    _PIPELINES.add(pipe)
    return pipe


# Image formats (as PIL names them) that DALI's decoder reads; anything else is replaced like an unreadable file.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
# Columns of the per-crop parameter vector fed to the pipeline (one float32 row per image and crop).
_ROI_START, _ROI_END, _FLIP, _JITTER, _FACTORS, _HUE_DEG, _GRAY, _BLUR, _SIGMA, _WINDOW = (
    slice(0, 2), slice(2, 4), 4, 5, slice(6, 9), 9, 10, 11, 12, 13)
_N_COLS = 14
BLUR_TRUNCATE = 4.0  # blur window = 2 * ceil(BLUR_TRUNCATE * sigma) + 1 taps (gpu_augment's truncation)


# ------------------------------------------------------------------------------------------------ the DALI graph
@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(spec: MultiCropSpec, source, device: str = "gpu"):
    """The graph. `source()` returns one step's inputs: the batch of encoded images (uint8 arrays) and, per crop,
    the [B, _N_COLS] float32 parameters (see `pack_params`); it raises StopIteration at the end of the epoch.
    Outputs: one HWC float32 batch per crop, normalised. `device` "gpu" (mixed decoder, GPU ops) or "cpu"."""
    gpu = device == "gpu"
    n = spec.n_crops
    encoded, *crop_params = fn.external_source(source=source, num_outputs=1 + n, batch=True,
                                               dtype=[types.UINT8] + [types.FLOAT] * n, ndim=[1] * (1 + n))
    decode_kw = {"jpeg_fancy_upsampling": True} if gpu else {}  # nvJPEG with libjpeg-turbo's chroma upsampling
    image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                              adjust_orientation=False, **decode_kw)
    to_dev = (lambda node: node.gpu()) if gpu else (lambda node: node)
    mean = [255 * m for m in spec.mean]
    std = [255 * s for s in spec.std]
    outputs = []
    for k, size in enumerate(spec.crop_sizes):  # (DALI's autograph has no zip(strict=...))
        p = crop_params[k]
        x = fn.resize(image, roi_start=p[0:2], roi_end=p[2:4], size=[size, size], interp_type=types.INTERP_LINEAR,
                      antialias=True)
        if p[_JITTER] > 0.5:
            x = fn.brightness_contrast(x, brightness=p[_FACTORS.start + BRIGHTNESS])
            c = to_dev(p[_FACTORS.start + CONTRAST])
            luma_mean = fn.reductions.mean(fn.color_space_conversion(x, image_type=types.RGB,
                                                                     output_type=types.GRAY))
            x = fn.cast(dmath.clamp(fn.cast(x, dtype=types.FLOAT) * c + luma_mean * (1 - c), 0, 255),
                        dtype=types.UINT8)
            x = fn.hsv(x, saturation=p[_FACTORS.start + SATURATION])
            x = fn.hsv(x, hue=p[_HUE_DEG])
        if p[_GRAY] > 0.5:
            y = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
            x = fn.cat(y, y, y, axis=2)
        if p[_BLUR] > 0.5:
            x = fn.gaussian_blur(x, sigma=p[_SIGMA], window_size=fn.cast(p[_WINDOW], dtype=types.INT32))
        outputs.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="HWC", mean=mean, std=std,
                                                mirror=fn.cast(p[_FLIP], dtype=types.INT32)))
    return tuple(outputs)


@pipeline_def
def decode_pipeline(device: str = "gpu"):
    """Decode only (the same decoder settings): finds the files that make the decoder fail."""
    gpu = device == "gpu"
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                             adjust_orientation=False, **({"jpeg_fancy_upsampling": True} if gpu else {}))


def pack_params(spec: MultiCropSpec, params) -> list[np.ndarray]:
    """AugmentParams ([n_crops, B, ...] tensors) -> one [B, _N_COLS] float32 array per crop."""
    top, left, h, w = params.boxes.double().unbind(-1)
    out = np.zeros((spec.n_crops, params.boxes.shape[1], _N_COLS), np.float64)
    out[..., _ROI_START] = torch.stack([top, left], -1).numpy()
    out[..., _ROI_END] = torch.stack([top + h, left + w], -1).numpy()
    out[..., _FLIP] = params.flip.numpy()
    out[..., _JITTER] = params.jitter.numpy()
    factors = params.jitter_factors.double()
    out[..., _FACTORS] = factors[..., [BRIGHTNESS, CONTRAST, SATURATION]].numpy()
    out[..., _HUE_DEG] = 360 * factors[..., HUE].numpy()  # torchvision's hue factor is in turns
    out[..., _GRAY] = params.gray.numpy()
    out[..., _BLUR] = params.blur.numpy()
    sigma = params.blur_sigma.double().numpy()
    out[..., _SIGMA] = sigma
    out[..., _WINDOW] = 2 * np.ceil(BLUR_TRUNCATE * sigma) + 1
    return list(out.astype(np.float32))


def apply(spec: MultiCropSpec, encoded: list[np.ndarray], params, device: torch.device | str = "cpu",
          num_threads: int = 1) -> list[torch.Tensor]:
    """The views of one batch of encoded images for given AugmentParams ([n_crops, B, ...]): replay, or hand-set
    parameters in tests. Runs a one-off pipeline (the loader's graph) and returns [B, 3, S, S] channels_last crops."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    batches = iter([(list(encoded), *pack_params(spec, params))])
    if gpu and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    pipe = _built(multicrop_pipeline(spec, lambda: next(batches), "gpu" if gpu else "cpu", batch_size=len(encoded),
                                     num_threads=num_threads, prefetch_queue_depth=1,
                                     device_id=device.index if gpu else None))
    stream = torch.cuda.current_stream(device) if gpu else None
    outputs = pipe.run(stream)  # on the GPU: outputs bound to torch's stream (see DaliLoader's loop)
    crops = []
    for out, size in zip(outputs, spec.crop_sizes, strict=True):
        t = torch.empty(len(encoded), size, size, 3, dtype=torch.float32, device=device)
        feed_ndarray(out.as_tensor(), t, cuda_stream=stream)
        crops.append(t.permute(0, 3, 1, 2))
    return crops


# ---------------------------------------------------------------------------------------------------- host side
def read_image(path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """The encoded bytes of `path` and its (height, width) from the header; raises OSError/ValueError for a file
    DALI cannot decode (see the module docstring)."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ValueError("empty file")
    # fast path for the common case, a JPEG with a well-formed header and its end-of-image marker: the size from
    # the frame header (pipelines/jpeg.py, a few microseconds); anything else goes through PIL below
    frame = jpeg_frame(data)
    if frame is not None and frame.height > 0 and frame.width > 0 and b"\xff\xd9" in data[-1024:].tobytes():
        return data, (frame.height, frame.width)
    try:
        im = Image.open(BytesIO(data.tobytes()))  # reads the header only
    except Image.UnidentifiedImageError:
        raise OSError("not an image file PIL can identify") from None  # (PIL's message names the BytesIO object)
    with im:
        fmt, (width, height) = im.format, im.size
        if fmt not in DALI_FORMATS:
            raise ValueError(f"{fmt} images are not decoded by DALI (supported: {', '.join(sorted(DALI_FORMATS))})")
        tail = data[-1024:].tobytes()
        if (fmt in ("JPEG", "MPO") and b"\xff\xd9" not in tail) or (fmt == "PNG" and b"IEND" not in tail):
            im.load()  # no end marker: truncated, unless trailing data follows; PIL's full decode decides
    if width < 1 or height < 1:
        raise ValueError(f"image of size {width} x {height}")
    return data, (height, width)


@dataclass
class _Step:
    """One step's host-side inputs, kept until its outputs are delivered (a failed run is rebuilt from them)."""

    step: int
    index: torch.Tensor
    paths: list[str]
    encoded: list[np.ndarray]
    params: list[np.ndarray]
    skipped: list[str]


class _StepMaker:
    """Prepares one step's host-side inputs (called in the loader's background thread, or by `DaliLoader._prepare`).
    It shares the loader's samples, `augment` and `unreadable` record but holds no reference to the loader, so a
    step being prepared never keeps the loader alive (nor makes its last reference, and DALI's shutdown with it, go
    away in a background thread). `reads` reads the step's files in parallel (None: one after the other, here)."""

    def __init__(self, loader: DaliLoader, reads: ThreadPoolExecutor | None):
        self.samples, self.batch_size, self.spec, self.augment = (loader.samples, loader.batch_size, loader.spec,
                                                                  loader.augment)
        self.seed, self.rank, self.unreadable, self.reads = loader.seed, loader.rank, loader.unreadable, reads

    def load(self, index: int) -> tuple[str, np.ndarray, tuple[int, int], list[str]]:
        # Runs in several threads at once, on chains of replacements that may overlap: a file fails the checks the
        # same way in every thread, so its entry (made here or taken from `unreadable`, which only caches it) and thus
        # the replacement and `skipped` do not depend on which thread meets it first. Files DALI rejects are marked
        # after a failed run, and the feeder then drops every step prepared (or being prepared) before: restart().
        path, (data, size), skipped = read_with_replacement(
            self.samples, index, read_image, (OSError, ValueError, SyntaxError, Image.DecompressionBombError),
            self.unreadable)
        return path, data, size, skipped

    def __call__(self, order: list[int], step: int, epoch: int) -> _Step:
        index = order[step * self.batch_size:(step + 1) * self.batch_size]
        paths, encoded, sizes, skipped = [], [], [], []
        for path, data, size, sk in (self.reads.map(self.load, index) if self.reads else map(self.load, index)):
            paths.append(path)
            encoded.append(data)
            sizes.append(size)
            skipped += sk
        params = self.augment.sample_params(torch.tensor(sizes, dtype=torch.int64),
                                            augment_generator(self.seed, epoch, self.rank, step, "cpu"))
        return _Step(step, torch.tensor(index), paths, encoded, pack_params(self.spec, params), skipped)


def _shut_down(*pools: ThreadPoolExecutor | None) -> None:
    """The loader's finaliser: the background threads end after the task they are running (queued ones are
    cancelled); not waited for, so a loader collected in any thread never blocks."""
    for pool in pools:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class DaliLoader:
    """Loader contract: iterable of MultiCropBatch on `device`, len() = steps per epoch, set_epoch(e, start_step).

    `device` cuda:i runs the DALI graph on GPU i (mixed decoder); cpu runs it on DALI's CPU backend (tests, demo).
    `workers` is DALI's thread count and the number of threads that read the files. `prefetch` batches are decoded
    ahead of the one being consumed. `read_ahead` steps beyond those are prepared (files read, parameters drawn) in
    a background thread (default prefetch + 2); 0 prepares each step in the thread that runs DALI, when DALI asks
    for it, with no background thread (the same batches; tests compare the two).
    """

    def __init__(self, spec: MultiCropSpec, data_path: str, batch_size: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 4, max_steps: int = 0,
                 prefetch: int = 2, read_ahead: int | None = None):
        self.samples, self.classes = scan_image_folder(data_path)
        self.num_samples = len(self.samples)
        self.spec, self.batch_size, self.device = spec, batch_size, torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_threads, self.prefetch = max(1, workers), max(1, prefetch)
        self.sampler = DistributedSampler(range(len(self.samples)), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed)
        self.steps = steps_per_epoch(len(self.sampler), batch_size, world_size, max_steps, len(self.samples),
                                     data_path)
        self.augment = GPUMultiCrop(spec)
        self.unreadable: dict[str, str] = {}  # path -> "path (reason)", every unreadable file met so far
        self.skipped: set[str] = set()  # reported once each
        self.epoch, self.start_step = 0, 0
        self._dali_device = "gpu" if self.device.type == "cuda" else "cpu"
        read_ahead = self.prefetch + 2 if read_ahead is None else max(0, read_ahead)
        # Background threads (none for read_ahead 0): one prepares whole steps in step order; with workers > 1,
        # `workers` more read the step's files (one file per task), otherwise the step thread reads them itself.
        self._steps = ThreadPoolExecutor(1, "dali-step") if read_ahead else None
        reads = ThreadPoolExecutor(self.num_threads, "dali-read") if read_ahead and self.num_threads > 1 else None
        self._maker = _StepMaker(self, reads)
        weakref.finalize(self, _shut_down, self._steps, reads)
        self._feeder = _Feeder(self, read_ahead)
        self._pipe = None
        self._pipe_state = "fresh"  # fresh (built or reset), running (an epoch in progress) or finished

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch; iteration then starts at batch `start_step` (resuming mid-epoch yields exactly the
        batches an uninterrupted epoch would have from there on)."""
        check_start_step(start_step, self.steps)
        self.sampler.set_epoch(epoch)
        self.epoch, self.start_step = epoch, start_step

    # ------------------------------------------------------------------------------------------ DALI plumbing
    def _pipeline_kwargs(self) -> dict:
        device_id = None
        if self._dali_device == "gpu":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return dict(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id)

    def _pipeline(self):
        """The DALI pipeline, ready for a new epoch: built on first use, rewound after a finished epoch, rebuilt
        after an error or an abandoned epoch (runs still in flight cannot be cancelled)."""
        if self._pipe is not None and self._pipe_state == "finished":
            self._pipe.reset()
        elif self._pipe is None or self._pipe_state != "fresh":
            self._pipe = _built(multicrop_pipeline(self.spec, self._feeder, self._dali_device,
                                                   prefetch_queue_depth=self.prefetch, **self._pipeline_kwargs()))
        self._pipe_state = "fresh"
        return self._pipe

    def _stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _to_torch(self, outputs) -> list[torch.Tensor]:
        crops = []
        stream = self._stream()
        for out, size in zip(outputs, self.spec.crop_sizes, strict=True):
            t = torch.empty(self.batch_size, size, size, 3, dtype=torch.float32, device=self.device)
            feed_ndarray(out.as_tensor(), t, cuda_stream=stream)  # dense [B, S, S, 3]
            crops.append(t.permute(0, 3, 1, 2))  # [B, 3, S, S] view of HWC memory: channels_last
        return crops

    # ------------------------------------------------------------------------------------------- host side
    def _prepare(self, order: list[int], step: int, epoch: int | None = None) -> _Step:
        """One step's host-side inputs, prepared in the calling thread (the files read by the read threads, if any);
        `epoch` defaults to the selected one. (The feeder has the background thread call the same `_StepMaker`.)"""
        return self._maker(order, step, self.epoch if epoch is None else epoch)

    def _find_undecodable(self, steps: list[_Step]) -> int:
        """Mark the files of `steps` that make DALI's decoder fail as unreadable; returns how many were found."""
        files = {p: d for s in steps for p, d in zip(s.paths, s.encoded, strict=True)}
        probe = None
        found = 0

        def decodes(chunk: list[str]) -> bool:
            nonlocal probe
            if probe is None:
                probe = _built(decode_pipeline(self._dali_device, exec_async=False, exec_pipelined=False,
                                               **self._pipeline_kwargs()))
            probe.feed_input("encoded", [files[p] for p in chunk])
            try:
                probe.run()
                return True
            except RuntimeError:
                probe = None  # invalid after an error
                return False

        todo = [list(files)[i:i + self.batch_size] for i in range(0, len(files), self.batch_size)]
        while todo:  # bisection: a chunk that decodes is clean, a failing one is split until single files
            chunk = todo.pop()
            if decodes(chunk):
                continue
            if len(chunk) == 1:
                self.unreadable[chunk[0]] = f"{chunk[0]} (RuntimeError: DALI's image decoder failed on it)"
                found += 1
            else:
                todo += [chunk[:len(chunk) // 2], chunk[len(chunk) // 2:]]
        return found

    def __iter__(self) -> Iterator[MultiCropBatch]:
        # The epoch's order is a pure function of (seed, epoch); skipping whole batches keeps the rest aligned.
        feeder = self._feeder
        run = feeder.restart(list(self.sampler), self.epoch, self.start_step)
        try:
            pipe = self._pipeline()
            self._pipe_state = "running"
            step = self.start_step
            while True:
                try:
                    # the first call schedules `prefetch` steps, each later one the next step. On the GPU the outputs
                    # are bound to torch's current stream: the copies out of them (_to_torch) are then ordered on that
                    # stream without the host waiting for it (unbound, the host waits for the stream at each copy,
                    # i.e. for the training step queued before it)
                    outputs = pipe.run(self._stream())
                except StopIteration:
                    break
                except RuntimeError as e:
                    # The failed run may be any of the scheduled ones, and the pipeline is invalid now: find the
                    # culprits among their files, then run the steps again (their replacements are deterministic).
                    self._pipe = None
                    found = self._find_undecodable(list(feeder.queue))
                    if found == 0:
                        raise
                    warnings.warn(f"DALI failed at step {step} ({type(e).__name__}): its decoder rejects {found} "
                                  "file(s) that passed the header checks; running the step again without them",
                                  DataWarning, stacklevel=2)
                    # every step prepared so far predates the files just marked: all are prepared again
                    run = feeder.restart(feeder.order, feeder.epoch, step)
                    pipe = self._pipeline()
                    self._pipe_state = "running"
                    continue
                s = feeder.queue.popleft()
                assert s.step == step, (s.step, step)
                crops = self._to_torch(outputs)
                warn_skipped_once(self.skipped, s.skipped, "unreadable", "the next image")
                yield MultiCropBatch(crops, s.index, s.skipped)
                step += 1
            self._pipe_state = "finished"
        finally:  # the end of the epoch, an error, or an abandoned epoch (the iterator closed or collected)
            feeder.stop(run)


class _Feeder:
    """The external_source callback: one step's inputs per call, in step order, from `next_step` on. Each step handed
    to DALI is queued until its outputs are taken (DALI runs `prefetch` steps ahead). The `depth` steps after the
    last one handed to DALI are prepared ahead in the loader's background thread: `ahead` holds their futures, so
    a call only waits for a step that is not finished yet (and raises its exception, if preparing it raised).
    `depth` 0: each step is prepared in the calling thread."""

    def __init__(self, loader: DaliLoader, depth: int):
        self._loader = weakref.ref(loader)  # the loader owns the pipeline, which owns this callback: no cycle
        self.depth = depth
        self.order: list[int] = []
        self.epoch = self.next_step = 0
        self.queue: deque[_Step] = deque()
        self.ahead: deque[Future] = deque()  # steps next_step, next_step + 1, ... being prepared or ready
        self.run = 0  # counts restarts: an iterator stops the feeder only if no newer one has restarted it

    def restart(self, order: list[int], epoch: int, step: int) -> int:
        """Feed `epoch` (`order` its sampler order) from `step` on. Every step handed to DALI or prepared ahead so
        far is dropped (it may predate files marked unreadable since, or be another epoch's). Returns the run's
        number, for `stop`."""
        self.stop(self.run)
        self.order, self.epoch, self.next_step = order, epoch, step
        self.run += 1
        loader = self._loader()
        if loader is not None:
            self._submit(loader)
        return self.run

    def stop(self, run: int) -> None:
        """Drop the steps queued and prepared ahead, unless a newer run has restarted the feeder. A step already
        being prepared finishes in the background and is dropped then."""
        if run == self.run:
            for future in self.ahead:
                future.cancel()
            self.ahead.clear()
            self.queue.clear()

    def _submit(self, loader: DaliLoader) -> None:
        """Have steps next_step .. next_step + depth - 1 of the epoch prepared or being prepared, in step order."""
        for step in range(self.next_step + len(self.ahead), min(self.next_step + self.depth, loader.steps)):
            self.ahead.append(loader._steps.submit(loader._maker, self.order, step, self.epoch))

    def __call__(self):
        loader = self._loader()
        if loader is None or self.next_step >= loader.steps:
            raise StopIteration
        if self.depth:
            self._submit(loader)
            s = self.ahead[0].result()  # waits if not ready; raises the preparation's exception (and again if retried)
            self.ahead.popleft()
        else:
            s = loader._prepare(self.order, self.next_step, self.epoch)
        self.queue.append(s)
        self.next_step += 1
        if self.depth:
            self._submit(loader)
        return (s.encoded, *s.params)


def build(spec: MultiCropSpec, cfg, device: torch.device, rank: int, world_size: int) -> DaliLoader:
    return DaliLoader(spec, cfg.data_path, cfg.batch_size, device, rank, world_size, cfg.seed, cfg.workers,
                      cfg.max_steps_per_epoch)

