"""Multi-crop data pipelines. Each one is declared by name here and returns the same Loader contract:
an iterable of MultiCropBatch on the device, len() = steps per epoch, set_epoch(e, start_step), disjoint shards per
rank, num_samples = images in the dataset."""

from __future__ import annotations

import importlib

import torch

from pipelines.spec import MultiCropBatch, MultiCropSpec

# name -> module with build(spec, cfg, device, rank, world_size); imported lazily so an optional
# dependency (DALI, FFCV) is only needed by the pipeline that uses it.
PIPELINES = {"reference": "pipelines.reference", "ffcv": "pipelines.ffcv", "dali": "pipelines.dali"}

__all__ = ["MultiCropBatch", "MultiCropSpec", "PIPELINES", "build"]


def build(spec: MultiCropSpec, cfg, device: torch.device, rank: int = 0, world_size: int = 1):
    if cfg.pipeline not in PIPELINES:
        raise ValueError(f"--pipeline {cfg.pipeline!r} is not available; choose one of {', '.join(PIPELINES)}")
    return importlib.import_module(PIPELINES[cfg.pipeline]).build(spec, cfg, device, rank, world_size)
