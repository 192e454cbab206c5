"""FFCV multi-crop pipeline: JPEG bytes from a .beton -> one batched decode -> pipelines/gpu_augment.py on the device.

The host does as little as possible per sample: FFCV's Loader (numba threads over a memory-mapped .beton written
by tools/write_ffcv.py) copies each sample's JPEG bytes into a batch buffer; each row is cut to its sample's
length and packed into a staging buffer (pinned memory on CUDA, two of them used in turn); the whole batch is
decoded by one `torchvision.io.decode_jpeg(list, mode=RGB, device=...)` call (nvJPEG on CUDA, on a stream kept for
decoding: see `decode_rgb`; libjpeg-turbo on CPU); GPUMultiCrop then draws every crop parameter on the device and
builds all crops there. The host waits for the device in two places: torchvision's CUDA decode returns only when
nvJPEG has finished (its own synchronisation), and before a staging buffer is reused, two batches later, the host
waits for the training stream to reach the point where that buffer's decode was handed over (which keeps the
host at most about two batches ahead of the training stream).

Order and sharding (a pure function of (seed, epoch, rank), like pipelines/reference.py):
- `order="random"` (default; FFCV's page cache = the OS page cache): exactly torch's DistributedSampler with
  shuffle=True and seed: one permutation per epoch of all samples, padded to a multiple of the rank count,
  rank r takes every world_size-th sample from position r. With a .beton written from an ImageFolder with no
  skipped files, sample i is the reference pipeline's image i, so both pipelines see the same images in the same
  order (the views differ: gpu_augment draws its own random numbers).
- `order="quasi_random"` (for a .beton larger than RAM; FFCV's own process cache, os_cache=False): FFCV's idea of
  reading few pages at a time, sharded: the .beton's pages are shuffled per epoch and dealt to the ranks in turn;
  each rank visits its pages in windows of 2 x batch_size pages and shuffles the samples within a window. Every
  rank then reads only its own pages. Ranks get slightly different sample counts; all use the smallest
  (drop_last). FFCV's QUASI_RANDOM itself refuses distributed mode, which is why this order is ours.

Augmentation randomness: one generator per (seed, epoch, rank, step) (gpu_augment.augment_generator) on the
device, so a resumed epoch (`set_epoch(epoch, start_step)`) yields the same batches and views from there on (bit
for bit on CPU; on CUDA to rounding, as cudnn.benchmark may pick another blur convolution algorithm in a new
process). The deviations of the augmentation from the PIL chain are listed in pipelines/gpu_augment.py; one more
comes from the decode: torchvision's nvJPEG decoder (created with default flags, no option to change them) does not
smooth the chroma upsampling as libjpeg-turbo's "fancy" upsampling does, and its inverse DCT differs, so decoded
pixels differ from PIL's by a level or two (the DALI pipeline asks nvJPEG for fancy upsampling; torchvision cannot).

A sample whose bytes fail to decode (tools/write_ffcv.py validated every image with PIL, but nvJPEG is stricter
than PIL about some files) is replaced by another image of the same batch; it is named in `batch.skipped` (and
warned about once), never a crash mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from pipelines.gpu_augment import GPUMultiCrop, augment_generator
from pipelines.reference import DataError, check_start_step, steps_per_epoch
from pipelines.spec import MultiCropBatch, MultiCropSpec, warn_skipped_once
from swav_fast.config import FFCV_ORDERS
from swav_fast.streams import private_stream

FIELDS = ("image", "label", "index")
HOW_TO_WRITE = "write one from an ImageFolder with `python tools/write_ffcv.py <ImageFolder root> <out>.beton`"
_INSTALL = "install it with `make env` (or `pip install ffcv numba`; FFCV needs libopencv-dev and libturbojpeg)"


def import_ffcv():
    """The ffcv package, or an ImportError that says how to install it.

    FFCV sets torch's process-wide intra-op thread count to its own worker count: once when imported (to 1) and
    whenever a Loader starts an epoch (ffcv.pipeline.compiler.Compiler.set_num_threads). That would silently change
    the speed of the training step (and, on CPU, its floating-point reduction order, so a resumed run would not
    repeat the uninterrupted one). Importing ffcv through this function restores torch's count and makes
    Compiler.set_num_threads set only numba's. Import ffcv through it everywhere.

    It also turns off the CUDA side of FFCV's epoch iterator (`ffcv.loader.epoch_iterator.IS_CUDA`). With a GPU
    present, FFCV takes four streams per epoch from PyTorch's shared pool, makes each wait for an event of the
    training stream and makes the training stream wait for each batch's stream. Our loaders ask FFCV for host
    bytes only (no ToDevice), so none of that guards anything: a batch's bytes stay valid until the next batch
    is taken (FFCV's slot count and queue see to that; raw_batches copies what it keeps). It costs a wait on the
    training stream per batch, and one of those pool streams can be the one torchvision's nvJPEG decoder took
    from the same pool, which decode_jpeg synchronises on: the host would then wait for the previous step.
    """
    threads = torch.get_num_threads()
    try:
        import ffcv
        import ffcv.loader  # noqa: F401
        from ffcv.pipeline.compiler import Compiler
    except ImportError as e:  # exercised by monkeypatching in tests
        raise ImportError(f"--pipeline ffcv needs the ffcv package, which is not importable ({e}); {_INSTALL}, "
                          "or use --pipeline reference") from e
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    if not getattr(Compiler, "_swav_fast_keeps_torch_threads", False):
        import numba

        def set_num_threads(cls, n: int) -> None:  # ffcv's, minus torch.set_num_threads
            cls.num_threads = n if n >= 1 else numba.config.NUMBA_NUM_THREADS
            numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

        Compiler.set_num_threads = classmethod(set_num_threads)
        Compiler._swav_fast_keeps_torch_threads = True
    import ffcv.loader.epoch_iterator

    ffcv.loader.epoch_iterator.IS_CUDA = False
    return ffcv


def open_beton(path: str | Path):
    """ffcv ``Reader`` of a file written by tools/write_ffcv.py, after checking that it is one.

    FileNotFoundError for a missing file; DataError (one line naming the file and saying to run
    tools/write_ffcv.py) for a directory, a file that is not an FFCV .beton, one whose fields are not
    image (BytesField), label (IntField), index (IntField), or one whose samples point past its end.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'{path}': no such .beton file; {HOW_TO_WRITE}")
    if not path.is_file():
        raise DataError(f"'{path}' is not a file: pass a .beton written by tools/write_ffcv.py, or "
                        f"{HOW_TO_WRITE} (an ImageFolder trains with --pipeline reference or dali)")
    import_ffcv()
    from ffcv.fields import BytesField, IntField
    from ffcv.reader import Reader
    from ffcv.types import CURRENT_VERSION, HeaderType

    file_size = path.stat().st_size
    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) == 0 or int(header[0]["version"]) != CURRENT_VERSION:
        why = (f"{file_size} bytes, shorter than a header" if len(header) == 0 else
               f"format version {int(header[0]['version'])} where ffcv {CURRENT_VERSION} is expected")
        raise DataError(f"'{path}' is not an FFCV .beton file ({why}); {HOW_TO_WRITE}")
    if int(header[0]["alloc_table_ptr"]) > file_size:
        raise DataError(f"'{path}' is truncated: {file_size} bytes, but its table of pages starts at byte "
                        f"{int(header[0]['alloc_table_ptr'])}; {HOW_TO_WRITE}")
    try:
        reader = Reader(str(path))
    except Exception as exc:  # noqa: BLE001 - ffcv fails on foreign bytes in many ways (IndexError, AssertionError)
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise DataError(f"'{path}' is not an FFCV .beton file (ffcv cannot read its header: {why}); "
                        f"{HOW_TO_WRITE}") from exc
    found = [(name, type(h).__name__) for name, h in reader.handlers.items()]
    want = [("image", "BytesField"), ("label", "IntField"), ("index", "IntField")]
    if found != want or not all(isinstance(h, t) for h, t in
                                zip(reader.handlers.values(), (BytesField, IntField, IntField), strict=True)):
        shown = ", ".join(f"{n} ({t})" for n, t in found) or "none"
        raise DataError(f"'{path}' is an FFCV .beton but not one written by tools/write_ffcv.py: its fields are "
                        f"{shown}, expected {', '.join(f'{n} ({t})' for n, t in want)}; {HOW_TO_WRITE}")
    md = reader.metadata
    if len(md) != int(reader.num_samples):
        raise DataError(f"'{path}' is truncated: {len(md)} of {int(reader.num_samples)} sample records; "
                        f"{HOW_TO_WRITE}")
    if len(md):
        end = md["f0"]["ptr"].astype(np.uint64) + md["f0"]["size"].astype(np.uint64)
        if int(end.max()) > file_size:
            raise DataError(f"'{path}' is truncated: samples point past its end ({file_size} bytes); "
                            f"{HOW_TO_WRITE}")
    return reader


def distributed_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """torch.utils.data.DistributedSampler(shuffle=True, drop_last=False)'s indices for (seed, epoch, rank): the
    order of the reference and dali loaders too."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return np.fromiter(sampler, dtype=np.int64, count=len(sampler))


def quasi_random_order(page_of_sample: np.ndarray, seed: int, epoch: int, rank: int, world_size: int,
                       window: int) -> np.ndarray:
    """Page-sharded quasi-random order: shuffled pages dealt to ranks in turn, samples shuffled within windows of
    `window` consecutive pages of a rank, all ranks cut to the smallest rank's count."""
    rng = np.random.default_rng([seed, epoch, 0x51])
    pages, inverse = np.unique(page_of_sample, return_inverse=True)
    order_of_pages = rng.permutation(len(pages))
    counts = np.bincount(inverse, minlength=len(pages))
    per_rank = [int(counts[order_of_pages[r::world_size]].sum()) for r in range(world_size)]
    mine = order_of_pages[rank::world_size]
    by_page = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    rank_rng = np.random.default_rng([seed, epoch, rank, 0x52])
    out = []
    for w in range(0, len(mine), window):
        samples = np.concatenate([by_page[starts[p]:starts[p + 1]] for p in mine[w:w + window]])
        out.append(rank_rng.permutation(samples))
    order = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return order[:min(per_rank)]


def pack_rows(rows: np.ndarray, sizes: np.ndarray, out: torch.Tensor) -> list[torch.Tensor]:
    """Copy row j's first sizes[j] bytes of `rows` [B, L] back to back into the uint8 tensor `out`; the views."""
    host, views, pos = out.numpy(), [], 0
    for j, s in enumerate(sizes.tolist()):
        host[pos:pos + s] = rows[j, :s]
        views.append(out[pos:pos + s])
        pos += s
    return views


def decode_rgb(data: list[torch.Tensor], device: torch.device | str,
               stream: torch.cuda.Stream | None = None) -> list[torch.Tensor | RuntimeError]:
    """[3, H, W] uint8 RGB images on `device` from JPEG bytes (1-D uint8 CPU tensors): one batched
    `torchvision.io.decode_jpeg` call (nvJPEG on CUDA), and, when it fails (one bad file fails the whole batch),
    each file alone; a file that still fails is returned as its exception.

    On CUDA the decode runs with `stream` (a stream kept for decoding: swav_fast.streams.private_stream, which no
    other code is handed) as the current stream, then the caller's stream waits for it and each image is marked as
    used there (record_stream). Why: torchvision (0.26 to 0.29 at least) allocates the images on the current stream
    but has nvJPEG write them from a stream of its own that never waits for the current one. Decoding on the
    caller's stream could therefore be handed memory just freed there whose last reads are still queued, and
    overwrite it before those reads run (a batch built from the wrong pixels, or a step reading garbage;
    pytorch/vision#9606). Memory allocated on the decode stream is only ever written by the decoder, and
    record_stream keeps each image's memory from being reused until the caller's stream is done with it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    if device.type != "cuda":
        return _decode_each_on_failure(decode_jpeg, data, ImageReadMode.RGB, "cpu")
    if stream is None:
        raise ValueError("decode_rgb on CUDA needs a stream kept for decoding (see the docstring)")
    caller = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        images = _decode_each_on_failure(decode_jpeg, data, ImageReadMode.RGB, device)
    caller.wait_stream(stream)
    for image in images:
        if not isinstance(image, Exception):
            image.record_stream(caller)
    return images


def replace_undecodable(images: list[torch.Tensor | Exception]) -> list[torch.Tensor] | None:
    """decode_rgb's batch with each failed entry replaced by the next decoded image of the batch (cyclically);
    None when no image of the batch decoded."""
    good = [k for k, im in enumerate(images) if not isinstance(im, Exception)]
    if not good:
        return None
    return [im if not isinstance(im, Exception) else images[min(good, key=lambda g: (g - k) % len(images))]
            for k, im in enumerate(images)]


def _decode_each_on_failure(decode_jpeg, data, mode, device) -> list[torch.Tensor | RuntimeError]:
    try:
        return decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        images = []
        for d in data:
            try:
                images.append(decode_jpeg(d, mode=mode, device=device))
            except RuntimeError as e:
                images.append(e)
        return images


def _traversal_order_class():
    """A ffcv TraversalOrder that hands FFCV the order we computed (ffcv is imported lazily)."""
    from ffcv.traversal_order.base import TraversalOrder

    class GivenOrder(TraversalOrder):
        # ffcv instantiates a custom order by calling it with the loader: the instance returns itself.
        def __init__(self, owner: FFCVLoader):
            self.owner, self.loader = owner, None

        def __call__(self, loader):
            self.loader = loader
            return self

        def sample_order(self, epoch: int):
            return self.owner.epoch_order()

    return GivenOrder


class FFCVLoader:
    """Loader contract: iterable of MultiCropBatch on `device`, len() = steps per epoch, set_epoch(e, start_step)."""

    def __init__(self, spec: MultiCropSpec, beton: str, batch_size: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int = 4, max_steps: int = 0, order: str = "random",
                 resample: str = "matmul", batches_ahead: int = 2):
        if order not in FFCV_ORDERS:
            raise ValueError(f"--ffcv_order must be one of {', '.join(FFCV_ORDERS)}, not {order!r}")
        reader = open_beton(beton)
        from ffcv.fields.decoders import BytesDecoder, IntDecoder
        from ffcv.loader import Loader

        self.beton, self.device, self.batch_size = str(beton), torch.device(device), batch_size
        self.rank, self.world_size, self.seed, self.order_kind = rank, world_size, seed, order
        self.num_samples = int(reader.num_samples)
        self.sizes = np.asarray(reader.metadata[f"f{FIELDS.index('image')}"]["size"], dtype=np.int64)
        if order == "quasi_random":
            # the page holding each sample's bytes, from the allocation table
            table = reader.alloc_table
            page_of = np.zeros(self.num_samples, dtype=np.int64)
            page_of[table["sample_id"]] = table["ptr"] // reader.page_size
            self.page_of_sample = page_of
        self.epoch, self.start_step = 0, 0
        shard = len(self._full_order(0))
        if shard < batch_size and order == "quasi_random" and len(np.unique(self.page_of_sample)) < 2 * world_size:
            raise DataError(f"{beton} has {len(np.unique(self.page_of_sample))} page(s) of {reader.page_size >> 20} "
                            f"MiB: too few for --ffcv_order quasi_random, which deals whole pages to the "
                            f"{world_size} ranks; use --ffcv_order random (the default)")
        self.steps = steps_per_epoch(shard, batch_size, world_size, max_steps, self.num_samples, beton)
        self.augment = GPUMultiCrop(spec, resample=resample)
        self.skipped: set[str] = set()
        self._staging: list[torch.Tensor | None] = [None, None]
        self._staged: list[torch.cuda.Event | None] = [None, None]
        self._slot = 0
        self._decode_stream: torch.cuda.Stream | None = None  # made at the first decode on CUDA
        self.loader = Loader(self.beton, batch_size=batch_size, num_workers=max(1, workers),
                             order=_traversal_order_class()(self), os_cache=order == "random", drop_last=True,
                             batches_ahead=batches_ahead,
                             pipelines={"image": [BytesDecoder()], "label": None, "index": [IntDecoder()]})

    # ------------------------------------------------------------------------------------------------ order
    def _full_order(self, epoch: int) -> np.ndarray:
        if self.order_kind == "random":
            return distributed_order(self.num_samples, self.seed, epoch, self.rank, self.world_size)
        return quasi_random_order(self.page_of_sample, self.seed, epoch, self.rank, self.world_size,
                                  2 * self.batch_size)

    def epoch_order(self) -> np.ndarray:
        """This rank's samples for the selected epoch, from batch start_step to the last step."""
        order = self._full_order(self.epoch)
        return order[self.start_step * self.batch_size:self.steps * self.batch_size].astype(np.uint64)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch; iteration then starts at batch `start_step` (resume mid-epoch)."""
        check_start_step(start_step, self.steps)
        self.epoch, self.start_step = epoch, start_step

    # -------------------------------------------------------------------------------------------- batches
    def raw_batches(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(step, FFCV's byte rows [B, longest sample], dataset indices) of the selected epoch from start_step.
        The rows are FFCV's reused buffer, valid until the next batch; each row's valid prefix is sizes[index]."""
        if self.start_step >= self.steps:
            return
        self.loader.next_epoch = self.epoch
        it = iter(self.loader)
        try:
            for step, (rows, index) in enumerate(it, start=self.start_step):
                yield step, rows, np.array(index[:, 0], dtype=np.int64)  # a copy: ffcv reuses its batch buffers
        finally:
            it.close()

    def host_batches(self) -> Iterator[tuple[int, list[torch.Tensor], np.ndarray]]:
        """(step, JPEG bytes as uint8 tensors staged for the decoder, dataset indices): the whole host side."""
        for step, rows, idx in self.raw_batches():
            yield step, self._stage(rows, self.sizes[idx]), idx

    def _stage(self, images: np.ndarray, sizes: np.ndarray) -> list[torch.Tensor]:
        """Cut each row to its sample's length. On CUDA the bytes are packed into one of two pinned buffers
        (nvJPEG copies them to the device; from pinned memory without a staging copy)."""
        if self.device.type != "cuda":
            return [torch.from_numpy(images[j, :s]) for j, s in enumerate(sizes.tolist())]
        slot, self._slot = self._slot, 1 - self._slot
        if self._staged[slot] is not None:
            # the training stream is past the decode that read this buffer two batches ago. torchvision's decode
            # already waited for nvJPEG before returning, so the buffer is free to reuse; this wait keeps that true
            # for a torchvision that would not, and bounds how far the host runs ahead of the training stream
            self._staged[slot].synchronize()
        buf = self._staging[slot]
        if buf is None or buf.numel() < int(sizes.sum()):
            buf = torch.empty(max(int(sizes.sum()), 2 * (buf.numel() if buf is not None else 0)), dtype=torch.uint8,
                              pin_memory=True)
            self._staging[slot] = buf
        return pack_rows(images, sizes, buf)

    def decode(self, data: list[torch.Tensor], idx: np.ndarray) -> tuple[list[torch.Tensor], list[str]]:
        """Decode a batch in one call (decode_rgb); a sample that fails is replaced by the next good one of the
        batch."""
        if self.device.type == "cuda" and self._decode_stream is None:
            self._decode_stream = private_stream(self.device)
        images = decode_rgb(data, self.device, self._decode_stream)
        skipped = [f"{self.beton} sample {int(i)} ({type(im).__name__}: {im})"
                   for im, i in zip(images, idx, strict=True) if isinstance(im, Exception)]
        if skipped:
            images = replace_undecodable(images)
            if images is None:
                raise DataError(f"no image of a batch of {self.beton} could be decoded (samples "
                                f"{idx[:5].tolist()}...): is it a tools/write_ffcv.py file?")
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._staged[1 - self._slot] = event  # the slot _stage just handed out
        return images, skipped

    def __iter__(self) -> Iterator[MultiCropBatch]:
        for step, data, idx in self.host_batches():
            images, skipped = self.decode(data, idx)
            warn_skipped_once(self.skipped, skipped, "undecodable", "another image of the batch")
            gen = augment_generator(self.seed, self.epoch, self.rank, step, self.device)
            crops = self.augment(images, gen)
            yield MultiCropBatch(crops, torch.from_numpy(idx), skipped)


def build(spec: MultiCropSpec, cfg, device: torch.device, rank: int, world_size: int) -> FFCVLoader:
    return FFCVLoader(spec, cfg.data_path, cfg.batch_size, device, rank, world_size, cfg.seed, cfg.workers,
                      cfg.max_steps_per_epoch, order=cfg.ffcv_order, resample=cfg.gpu_resample)
