"""Atomic checkpoints (temp file + fsync + rename) and the trunk export."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swav_fast.model import trunk_state_dict

FORMAT = "swav_fast/1"
CHECKPOINT_NAME = "checkpoint.pth"


class CheckpointError(RuntimeError):
    """An unusable checkpoint; the message names the file."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write so that `path` is always either the old complete file or the new complete file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path, map_location: torch.device | str = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a swav_fast checkpoint (format {FORMAT} expected)")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_trunk(model_state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Save the trunk with torchvision keys: torchvision.models.<arch>() loads it with only fc.* missing."""
    save_atomic({k: v.detach().cpu() for k, v in trunk_state_dict(model_state).items()}, path)
