"""LARS (SGD + apex LARC, clip=False) without host syncs, and the official warmup + cosine schedule."""

from __future__ import annotations

import math

import numpy as np
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum wrapped by LARC as facebookresearch/swav uses it (REFERENCE section 5).

    Per parameter with ||p|| != 0 and ||g|| != 0:  local = trust * ||p|| / (||g|| + wd ||p|| + eps),
    g <- (g + wd p) * local; otherwise g is left as it is (no weight decay either). Then buf <- m buf + g,
    p <- p - lr buf. apex decides the zero case with a Python `if` on two norms (two host syncs per
    parameter); here it is a torch.where over all norms at once, so the step never waits for the device.
    Momentum buffers start at zero, which gives the same first update as torch.optim.SGD (buf = g).
    Parameters whose grad is None are skipped entirely, as SGD does.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr {lr}, momentum {momentum}, wd {weight_decay} or trust "
                             f"{trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - the Optimizer signature
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                lars_update_(params, [p.grad for p in params], self._buffers(params), group["lr"], group)

    @torch.no_grad()
    def prepare(self) -> None:
        """Allocate every gradient and momentum buffer now (zeros), so that steps never allocate them.

        Zero momentum gives the same first update as a lazily created buffer (buf = g), and a zero grad the
        same as none (see the class docstring): the numbers do not change, the step's tensors become static.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self._buffers(group["params"])

    def zero_grads_(self) -> None:
        """In-place zeroing of the prepared gradients (backward then accumulates into the same tensors)."""
        torch._foreach_zero_([p.grad for g in self.param_groups for p in g["params"]])

    @torch.no_grad()
    def update(self, lr: float | torch.Tensor) -> None:
        """One step with `lr` for every group (a 0-dim device tensor keeps the step free of host values).
        Needs prepare(); unlike step() it is plain tensor code that torch.compile can trace."""
        for group in self.param_groups:
            params = group["params"]
            lars_update_(params, [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params], lr,
                         group)

    def _buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return bufs


def lars_update_(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                 lr: float | torch.Tensor, group: dict) -> None:
    """The LARC-scaled momentum SGD update of one parameter group, in place (the gradients are scaled in place, as
    apex LARC does), with foreach ops and no host sync."""
    wd, trust, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
    p_norm = torch.stack(torch._foreach_norm(params))
    g_norm = torch.stack(torch._foreach_norm(grads))
    ok = (p_norm > 0) & (g_norm > 0)
    # apex's order, in place on the gradients as apex does: g += wd p; g *= local. The zero-norm cases leave g
    # as it was with no branch: ||p|| = 0 means wd p = 0, so local = 1 keeps g; ||g|| = 0 means g + wd p = wd p,
    # so local = 0 gives back the zero g.
    local = torch.where(ok, trust * p_norm / (g_norm + wd * p_norm + eps), (g_norm > 0).to(p_norm.dtype))
    if wd:
        torch._foreach_add_(grads, params, alpha=wd)
    torch._foreach_mul_(grads, list(local.unbind()))
    torch._foreach_mul_(bufs, group["momentum"])
    torch._foreach_add_(bufs, grads)
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))
    else:
        torch._foreach_add_(params, bufs, alpha=-lr)


def lr_schedule(base_lr: float, final_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                start_warmup: float = 0.0) -> np.ndarray:
    """Learning rate of every iteration, exactly as main_swav.py builds it.

    Linear warmup start_warmup -> base_lr over warmup_epochs (np.linspace, so its last value is base_lr),
    then final_lr + (base_lr - final_lr)/2 (1 + cos(pi t / T)) for t = 0 .. T-1, T = the remaining iterations.
    """
    warmup = np.linspace(start_warmup, base_lr, steps_per_epoch * warmup_epochs)
    n_cos = steps_per_epoch * (epochs - warmup_epochs)
    t = np.arange(n_cos)
    cosine = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(math.pi * t / n_cos))
    return np.concatenate((warmup, cosine))
