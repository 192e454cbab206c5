"""Guards of a long run. The loss, watched without adding host syncs: its values reach the host by asynchronous
copies, read one window of steps after they were made, and are checked there. The output: a run outlives the
terminal or pipe it prints to (OutputGuard)."""

from __future__ import annotations

import math
import os
import sys

import torch


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the first such iteration."""


def first_non_finite(losses: list[float], first_iteration: int) -> None:
    """Raise NonFiniteLoss naming the first bad step of a window of per-step losses."""
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            raise NonFiniteLoss(f"the loss is {v} at iteration {first_iteration + i}")


class CollapseMonitor:
    """Warns once when the loss stays within `margin` of ln K for `window` steps after the freeze window.

    A loss of ln K means uniform predictions against uniform codes: every sample looks the same to the
    prototypes, the trivial solution SwAV's equipartition is meant to prevent (REFERENCE section 9).
    """

    REMEDIES = ("--epsilon 0.03 (sharper codes), a longer --freeze_prototypes_niters, fewer or weaker crops "
                "(--nmb_crops, --min_scale_crops), a later --epoch_queue_starts or a shorter --queue_length")

    def __init__(self, ln_k: float, margin: float, window: int, after_iteration: int):
        self.ln_k, self.margin, self.window, self.after = ln_k, margin, window, after_iteration
        self.run = 0
        self.warned = False

    def update(self, losses: list[float], first_iteration: int) -> str | None:
        """Feed per-step losses (the first at `first_iteration`); returns the warning the first time it fires."""
        if self.window <= 0 or self.warned:
            return None
        for i, v in enumerate(losses):
            if first_iteration + i < self.after:
                continue
            self.run = self.run + 1 if abs(v - self.ln_k) < self.margin else 0
            if self.run >= self.window:
                self.warned = True
                return (f"the loss has stayed within {self.margin} of ln K = {self.ln_k:.3f} for {self.window} steps "
                        f"(to iteration {first_iteration + i}) after the prototype-freeze window: the run has "
                        f"probably collapsed. Remedies: {self.REMEDIES}.")
        return None


class LossLog:
    """Per-step losses kept on the device and read by the host one window late, so that reading them never stalls.

    `add(loss)` writes a step's loss into a device buffer (a copy kernel; no sync). `close_window(info)` ends the
    window: it starts an asynchronous copy of the window's losses into pinned host memory and records an event
    after it, then returns the windows whose values are on the host, each as (losses, info): normally the previous
    window, whose copy was queued a whole window of steps earlier and has long finished, so waiting for its event
    costs nothing; with `flush=True` also this one (a real wait for the device, for the points where the values
    must be checked now: before a checkpoint, at the end of an epoch). On CPU the copy is synchronous, but the
    windows are handed back in the same delayed order, so the logic is the one the GPU runs.
    """

    def __init__(self, window: int, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.values = torch.zeros(window, device=self.device)
        self.host = torch.zeros(window, pin_memory=self.cuda)
        self.n = 0  # steps in the open window
        self.pending: tuple[int, object, dict] | None = None  # (steps, event, info) of the window being copied

    def __len__(self) -> int:
        return self.n

    @property
    def full(self) -> bool:
        return self.n == self.values.shape[0]

    def add(self, loss: torch.Tensor) -> None:
        if self.full:
            raise RuntimeError(f"LossLog: window of {self.n} steps is full; close_window() first")
        self.values[self.n] = loss.detach()
        self.n += 1

    def close_window(self, info: dict, flush: bool = False) -> list[tuple[list[float], dict]]:
        ready = self._take_pending()
        if self.n:
            self.host[:self.n].copy_(self.values[:self.n], non_blocking=self.cuda)
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
            self.pending, self.n = (self.n, event, info), 0
        if flush:
            ready += self._take_pending()
        return ready

    def _take_pending(self) -> list[tuple[list[float], dict]]:
        if self.pending is None:
            return []
        n, event, info = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return [(self.host[:n].tolist(), info)]


class OutputGuard:
    """sys.stdout or sys.stderr for a long run: a failing write or flush does not stop the run.

    A training job outlives whoever watches it. When an ssh connection drops, the terminal is gone (writes fail
    with EIO) and a `| tee log` in the same job dies of the hang-up too (EPIPE); an exception from a progress line
    would then end the run before the checkpoint that SIGHUP asks for. The first error is kept in `lost`, the
    stream's file descriptor is pointed at /dev/null (so that buffered text, C++ warnings and the interpreter's
    last flush go nowhere instead of failing again), and later output is dropped. Everything else (isatty,
    fileno, encoding, ...) is the wrapped stream's."""

    def __init__(self, stream):
        self.stream, self.lost = stream, None

    def _lose(self, e: Exception) -> None:
        self.lost = e
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError, AttributeError):  # not a file (a test's capture): nothing to redirect
            return
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)

    def write(self, text: str) -> int:
        if self.lost is None:
            try:
                return self.stream.write(text)
            except (OSError, ValueError) as e:  # EIO, EPIPE; ValueError: the stream was closed
                self._lose(e)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.lost is None:
            try:
                self.stream.flush()
            except (OSError, ValueError) as e:
                self._lose(e)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def guard_output() -> None:
    """Wrap sys.stdout and sys.stderr in OutputGuards (once; for scripts, before any output)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, OutputGuard):
            setattr(sys, name, OutputGuard(stream))


def lost_output() -> list[tuple[str, str]]:
    """(stream name, error) for each of sys.stdout and sys.stderr whose OutputGuard lost its output."""
    return [(name, f"{type(g.lost).__name__}: {g.lost}") for name in ("stdout", "stderr")
            if isinstance(g := getattr(sys, name), OutputGuard) and g.lost is not None]
