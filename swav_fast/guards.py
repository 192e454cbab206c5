"""Watching the loss without adding host syncs: its values reach the host by asynchronous copies, read one window
of steps after they were made, and are checked there."""

from __future__ import annotations

import math

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
