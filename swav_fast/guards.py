"""Watching the loss without adding host syncs: it is checked only where the loop reads it anyway."""

from __future__ import annotations

import math


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
