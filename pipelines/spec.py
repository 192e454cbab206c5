"""The two contracts every pipeline shares: what to produce (MultiCropSpec) and what it hands over (MultiCropBatch)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
# The official SwAV code uses 0.228 for the red channel (torchvision's usual value is 0.229); kept for fidelity.
SWAV_STD = (0.228, 0.224, 0.225)


@dataclass(frozen=True)
class CropGroup:
    """`count` crops of `size` x `size` pixels, RandomResizedCrop area fraction in [min_scale, max_scale]."""

    size: int
    count: int
    min_scale: float
    max_scale: float


@dataclass(frozen=True)
class MultiCropSpec:
    """Everything a pipeline needs to know to produce the SwAV multi-crop views (REFERENCE section 6)."""

    groups: tuple[CropGroup, ...]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    # brightness, contrast, saturation, hue for strength s = 1: (0.8s, 0.8s, 0.8s, 0.2s)
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = SWAV_STD

    @classmethod
    def from_config(cls, cfg) -> MultiCropSpec:
        groups = tuple(
            CropGroup(s, n, lo, hi)
            for s, n, lo, hi in zip(
                cfg.size_crops, cfg.nmb_crops, cfg.min_scale_crops, cfg.max_scale_crops, strict=True
            )
        )
        s = cfg.color_jitter_strength
        return cls(groups=groups, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), blur_prob=cfg.blur_prob)

    @property
    def n_crops(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def crop_sizes(self) -> list[int]:
        """Side of every crop, in output order (large crops first, as configured)."""
        return [g.size for g in self.groups for _ in range(g.count)]


@dataclass
class MultiCropBatch:
    """One step's input: `crops[i]` is [B, 3, H_i, W_i], normalised float, channels_last, on the target device.

    `index` holds the dataset indices of the B images (for reproducibility checks and resume);
    `skipped` names files that could not be decoded while building this batch (they were replaced, see
    the pipeline), so the training loop can count and report them.
    """

    crops: list[torch.Tensor]
    index: torch.Tensor
    skipped: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.crops[0].shape[0]

    def pin_memory(self) -> MultiCropBatch:
        """Called by a DataLoader with pin_memory=True (its pinning thread), which pins only tensors and standard
        containers, and objects with this method: without it the crops would stay pageable and the host-to-device
        copy would neither be asynchronous nor overlap the step."""
        return MultiCropBatch([c.pin_memory() for c in self.crops], self.index, self.skipped)


class DataWarning(UserWarning):
    """A data problem the run gets past (an unreadable image replaced): train.py prints it as one plain line."""


def warn_skipped_once(seen: set[str], entries: list[str], what: str, replaced_by: str) -> None:
    """One warning per unreadable file over a loader's life (`seen` holds those already reported); the training
    loop counts every occurrence from `MultiCropBatch.skipped`. Called from a loader's __iter__, so the warning
    points at the loop that consumes the batches."""
    for entry in entries:
        if entry not in seen:
            seen.add(entry)
            warnings.warn(f"skipped {what} image {entry}; replaced by {replaced_by}", DataWarning, stacklevel=3)
