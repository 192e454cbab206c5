"""Checkpoints: atomic (temp file + fsync + rename), checksummed, the last k kept; and the trunk export.

A run directory holds `checkpoints/ckpt_<iteration>.pth`, each with a `.sha256` sidecar written after it.
Loading walks from the newest to the oldest and takes the first one whose bytes match its checksum and that
unpickles, naming every file it passed over: a checkpoint cut short by a kill, a full disk or a copy error
costs the steps since the previous one, never the run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import random
import socket
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from swav_fast.model import trunk_state_dict

FORMAT = "swav_fast/1"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "train.lock"


class CheckpointError(RuntimeError):
    """An unusable checkpoint; the message names the file."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, permissions); the message says why."""


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock; the message says which."""


def lock_run_dir(run_dir: Path) -> IO[str] | None:
    """An exclusive lock on `run_dir/train.lock`, held while the returned file stays open (and while this process
    opens the file no other time: closing any descriptor of it drops a POSIX lock); the system releases it
    when the process ends however it ends (a kill included), so a stale lock cannot block a resume. The file names
    its holder (pid, host, start time) for the message of the process it turns away. Raises RunDirBusy when another
    process holds it; returns None where the filesystem refuses locks (some network filesystems): no protection
    there. OSError for a directory this user cannot write."""
    f = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the run
    try:
        # a POSIX record lock (lockf), not flock: it belongs to this process alone, so the data loader's forked
        # workers, which outlive a killed parent by a few seconds, do not keep holding it
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            f.seek(0)
            holder = f.read().strip() or "a process that has not yet written its name"
            f.close()
            raise RunDirBusy(holder) from None
        f.close()  # ENOLCK and the like: no locks on this filesystem
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save so that `path` is always either the old complete file or the new complete file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(buf.getvalue(), path)


def write_atomic(data: bytes, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
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


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"ckpt_{iteration:09d}.pth"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((Path(run_dir) / CHECKPOINT_DIR).glob("ckpt_*.pth"))


def kept_checkpoint_path(run_dir: str | Path, epochs_done: int) -> Path:
    """Where --checkpoint_freq keeps an epoch's checkpoint for good (not among list_checkpoints, never dropped)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch_{epochs_done:04d}.pth"


def save_checkpoint(state: dict, run_dir: str | Path, keep: int, keep_also_as: Path | None = None) -> Path:
    """Write checkpoints/ckpt_<iteration>.pth and its checksum, then drop all but the newest `keep`; with
    `keep_also_as`, the same file (a hard link where the filesystem has them) and its checksum there too."""
    path = checkpoint_path(run_dir, state["iteration"])
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(data, path)
    # the sidecar comes second: a checkpoint without one was interrupted and is not trusted
    try:
        write_atomic(f"{digest}  {path.name}\n".encode(), _sidecar(path))
    except BaseException:  # e.g. a full disk: leave no checkpoint that looks newest but cannot be loaded
        path.unlink(missing_ok=True)
        raise
    if keep_also_as is not None:
        tmp = keep_also_as.with_name(f".{keep_also_as.name}.link{os.getpid()}")
        try:
            os.link(path, tmp)  # no second copy of the bytes; then renamed over any older file of that name
            os.replace(tmp, keep_also_as)
        except OSError:  # no hard links here (some network and FAT filesystems): a copy
            tmp.unlink(missing_ok=True)
            write_atomic(data, keep_also_as)
        write_atomic(f"{digest}  {keep_also_as.name}\n".encode(), _sidecar(keep_also_as))
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        _sidecar(old).unlink(missing_ok=True)
    return path


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def describe(path: Path) -> str:
    """The checkpoint's path and the start of the sha256 its sidecar records ("unchecked" without one): equal on
    two machines means the same file, found without reading it."""
    try:
        digest = _sidecar(path).read_text().split()[0][:16]
    except (OSError, IndexError):
        digest = "unchecked"
    return f"{path} (sha256 {digest})"


def load(path: str | Path) -> dict:
    """Load one checkpoint into host memory, verifying its checksum when it has a sidecar; errors name the file.

    Always to the CPU: the RNG states must be host ByteTensors (set_rng_state refuses a CUDA one), and
    load_state_dict copies the weights, the optimiser (Optimizer.load_state_dict moves its state to each
    parameter's device) and the queue to the training device without holding a second copy there.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    side = _sidecar(path)
    if side.is_file():
        expected = (side.read_text().split() or [""])[0]
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"checkpoint {path} does not match its checksum {side.name} (truncated or corrupt)")
    elif path.parent.name == CHECKPOINT_DIR:
        raise CheckpointError(f"checkpoint {path} has no checksum file {side.name} (its write was interrupted)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a swav_fast checkpoint (format {FORMAT} expected); to start a run from "
                              "the weights of an official SwAV checkpoint or a trunk, pass it to --init_from")
    return state


def load_latest(run_dir: str | Path, warn=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies and loads; each one passed over is named through `warn`."""
    bad: list[str] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load(path)
        except CheckpointError as e:
            bad.append(str(path))
            warn(f"skipping {e}")
            continue
        if bad:
            warn(f"resuming from the previous good checkpoint {path} instead of {', '.join(bad)}")
        return path, state
    if bad:
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINT_DIR}: {', '.join(bad)} "
                              "all failed their checks")
    return None


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
