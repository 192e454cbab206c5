"""Reference multi-crop pipeline: PIL + torchvision transforms in DataLoader workers, the official semantics.

This is the baseline the GPU pipelines must beat and the oracle they are tested against. Per crop
(REFERENCE section 6): RandomResizedCrop (bilinear) -> flip -> RandomApply(ColorJitter, p 0.8) ->
RandomGrayscale(p 0.2) -> PIL Gaussian blur (p 0.5, radius uniform in [0.1, 2]) -> ToTensor -> Normalize.

Two choices differ from facebookresearch/swav without changing the distribution of views:
- every random draw uses torch's generator (the official blur draws from numpy and `random`), and that
  generator is re-seeded per sample from (seed, epoch, dataset index). Views are therefore a pure function
  of (seed, epoch, index): the same whatever the worker count, rank count or resume point.
- an image that cannot be decoded is replaced by the next decodable image in the dataset (the official
  loader crashes); the file is named in a warning and counted by the training loop.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from pipelines.spec import MultiCropBatch, MultiCropSpec, warn_skipped_once

# Replacing an undecodable image tries at most this many following images before giving up.
MAX_REPLACEMENTS = 16


class DataError(ValueError):
    """A problem with the user's data; the message names the path and what to do."""


def read_with_replacement(samples: list[tuple[str, int]], index: int, read, errors: tuple[type[Exception], ...],
                          unreadable: dict[str, str] | None = None) -> tuple[str, object, list[str]]:
    """(path, read(path), skipped) for the first of samples index, index + 1, ... (cyclic) that `read` accepts;
    `skipped` names each file passed over and why. `unreadable` (path -> that entry), when given, remembers
    failures so a file is not read again. A DataError after MAX_REPLACEMENTS + 1 failures in a row."""
    skipped = []
    for k in range(MAX_REPLACEMENTS + 1):
        path = samples[(index + k) % len(samples)][0]
        if unreadable is not None and path in unreadable:
            skipped.append(unreadable[path])
            continue
        try:
            return path, read(path), skipped
        except errors as e:
            skipped.append(f"{path} ({type(e).__name__}: {e})")
            if unreadable is not None:
                unreadable[path] = skipped[-1]
    raise DataError(f"{MAX_REPLACEMENTS + 1} images in a row from {samples[index][0]} could not be decoded: "
                    "check the dataset")


def steps_per_epoch(shard: int, batch_size: int, world_size: int, max_steps: int, n_images: int, source) -> int:
    """Whole batches in a rank's `shard` of samples (drop_last), capped by `max_steps` (0: no cap); a DataError
    naming `source` when there is not even one. Every loader counts its epoch so."""
    steps = shard // batch_size
    if steps == 0:
        raise DataError(f"{source} has {n_images} images: fewer than one global batch ({batch_size} x {world_size} "
                        "ranks); lower --batch_size or add images")
    return min(steps, max_steps) if max_steps else steps


def check_start_step(start_step: int, steps: int) -> None:
    """set_epoch's check of where a resumed epoch starts (0..steps; steps: nothing left of it)."""
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} is outside the epoch's {steps} steps")


def scan_image_folder(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every image under root/<class>/, sorted; errors name the directory."""
    if not str(root):
        raise DataError("no data directory given: pass --data_path pointing to an ImageFolder root")
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory '{root}' does not exist: pass --data_path pointing to an ImageFolder "
                        "root (one sub-folder of JPEGs per class); the demo data is built by "
                        "`python tools/make_demo_data.py --out data/demo`")
    if not root.is_dir():
        hint = " (a .beton file is read by --pipeline ffcv)" if root.suffix == ".beton" else ""
        raise DataError(f"data path '{root}' is a file, not a directory: pass the ImageFolder root{hint}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"data directory '{root}' has no class sub-folders: expected {root}/<class>/<image>.jpg "
                        "(for unlabelled data, put all images in one sub-folder)")
    samples = []
    for ci, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.suffix.lower() in IMG_EXTENSIONS and p.is_file():
                samples.append((str(p), ci))
    if not samples:
        raise DataError(f"data directory '{root}' has class folders but no images with extensions "
                        f"{', '.join(IMG_EXTENSIONS)}")
    return samples, classes


class PILGaussianBlur:
    """Official PILRandomGaussianBlur: with probability p, PIL GaussianBlur with radius ~ U[lo, hi]."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.lo, self.hi = p, sigma[0], sigma[1]

    def __call__(self, img: Image.Image) -> Image.Image:
        # `rand <= p` as in the official code; both draws always happen so the stream of draws is fixed.
        do_it = torch.rand(()).item() <= self.p
        radius = self.lo + (self.hi - self.lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius)) if do_it else img


def crop_transforms(spec: MultiCropSpec) -> list[transforms.Compose]:
    """One torchvision transform per output crop, in output order."""
    b, c, s, h = spec.jitter
    out = []
    for g in spec.groups:
        chain = transforms.Compose([
            transforms.RandomResizedCrop(g.size, scale=(g.min_scale, g.max_scale), ratio=spec.ratio),
            transforms.RandomHorizontalFlip(p=spec.flip_prob),
            transforms.RandomApply([transforms.ColorJitter(b, c, s, h)], p=spec.jitter_prob),
            transforms.RandomGrayscale(p=spec.grayscale_prob),
            PILGaussianBlur(spec.blur_prob, spec.blur_sigma),
            transforms.ToTensor(),
            transforms.Normalize(mean=spec.mean, std=spec.std),
        ])
        out.extend([chain] * g.count)
    return out


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch, index) (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) >> 1


@contextlib.contextmanager
def seeded_draws(seed: int, epoch: int, index: int) -> Iterator[None]:
    """torch's global generator seeded with sample_seed(seed, epoch, index) inside the block, so that a sample's
    random view is a pure function of the three; the caller's generator state is restored after it (that matters
    in the main process, with workers=0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(seed, epoch, index))
        yield


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class MultiCropDataset(Dataset):
    """ImageFolder images -> (list of crop tensors, index, skipped file names)."""

    def __init__(self, root: str | Path, spec: MultiCropSpec, seed: int = 0):
        self.samples, self.classes = scan_image_folder(root)
        self.spec, self.seed, self.epoch = spec, seed, 0
        self.transforms = crop_transforms(spec)

    def __len__(self) -> int:
        return len(self.samples)

    def _open(self, index: int) -> tuple[Image.Image, list[str]]:
        # skipped files are reported by the loader in the main process (a worker's warning would be lost or repeated)
        _, img, skipped = read_with_replacement(self.samples, index, _open_rgb,
                                                (OSError, ValueError, Image.DecompressionBombError))
        return img, skipped

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int, list[str]]:
        img, skipped = self._open(index)
        with seeded_draws(self.seed, self.epoch, index):
            crops = [t(img) for t in self.transforms]
        return crops, index, skipped


def _ignore_ctrl_c(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's signature
    """A DataLoader worker ignores SIGINT. Ctrl-C in a terminal reaches the whole process group; train.py answers
    it by going on to the next agreement point and writing a checkpoint, which needs the workers, and a forked
    worker would otherwise run train.py's handler too (announcing the stop once per worker) or, on a second press,
    die of KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate(items: list[tuple[list[torch.Tensor], int, list[str]]]) -> MultiCropBatch:
    """Runs in a DataLoader worker: the crops are stacked straight into channels_last tensors, so that the copy to
    the device keeps that layout and the model's input needs no conversion there."""
    crops = []
    for i in range(len(items[0][0])):
        first = items[0][0][i]
        out = torch.empty((len(items), *first.shape), dtype=first.dtype, memory_format=torch.channels_last)
        for j, it in enumerate(items):
            out[j].copy_(it[0][i])
        crops.append(out)
    return MultiCropBatch(crops, torch.tensor([it[1] for it in items]), [p for it in items for p in it[2]])


class ReferenceLoader:
    """Loader contract: iterable of MultiCropBatch on `device`, len() = steps per epoch, set_epoch(e)."""

    def __init__(self, spec: MultiCropSpec, data_path: str, batch_size: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 4, max_steps: int = 0):
        self.dataset = MultiCropDataset(data_path, spec, seed)
        self.num_samples = len(self.dataset)
        # DistributedSampler semantics as the official loader (whose sampler seed is 0; ours is --seed): shuffled
        # with (seed, epoch), padded to a multiple of world_size, every rank a disjoint strided shard; the
        # DataLoader drops the last partial batch.
        self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.device, self.workers = batch_size, device, workers
        self.steps = steps_per_epoch(len(self.sampler), batch_size, world_size, max_steps, len(self.dataset),
                                     data_path)
        self.skipped: set[str] = set()  # every undecodable file met so far, reported once each
        self.start_step = 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch; iteration then starts at batch `start_step` (resuming mid-epoch yields exactly
        the batches an uninterrupted epoch would have from there on)."""
        check_start_step(start_step, self.steps)
        self.sampler.set_epoch(epoch)
        self.dataset.epoch = epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[MultiCropBatch]:
        # The epoch's order is a pure function of (seed, epoch); skipping whole batches keeps the rest aligned.
        order = list(self.sampler)[self.start_step * self.batch_size:]
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=order, drop_last=True,
                            num_workers=self.workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
                            persistent_workers=False, worker_init_fn=_ignore_ctrl_c,
                            # its own generator: DataLoader otherwise draws a base seed from the global RNG,
                            # which would make training depend on the loader (our views are seeded per sample)
                            generator=torch.Generator().manual_seed(self.dataset.seed))
        for step, batch in enumerate(loader, start=self.start_step):
            if step >= self.steps:
                break
            warn_skipped_once(self.skipped, batch.skipped, "unreadable", "the next image")
            batch.crops = [c.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                           for c in batch.crops]
            yield batch


def build(spec: MultiCropSpec, cfg, device: torch.device, rank: int, world_size: int) -> ReferenceLoader:
    return ReferenceLoader(spec, cfg.data_path, cfg.batch_size, device, rank, world_size, cfg.seed,
                           cfg.workers, cfg.max_steps_per_epoch)
