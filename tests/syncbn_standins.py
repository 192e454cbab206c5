"""CPU stand-ins for the CUDA-only kernels of synchronised batch norm (torch.batch_norm_stats, ..._gather_stats_with_
counts, ..._elemt, ..._backward_reduce, ..._backward_elemt), so that torch's SyncBatchNorm Function and
swav_fast.syncbn run on CPU tensors and gloo ranks. Plain tensor formulas of what the CUDA kernels compute (per
channel: biased variance within a rank, counts-weighted merge across ranks, running statistics updated with the
unbiased variance). `register()` installs them for the CPU backend of this process; tests call it only in
subprocesses or spawned ranks, never in pytest's own process.
"""

from __future__ import annotations

import torch

_LIB = None


def _shape(x):
    return [1, -1] + [1] * (x.dim() - 2)


def _dims(x):
    return [0, *range(2, x.dim())]


def stats(x, eps):
    x = x.float()
    return x.mean(_dims(x)), torch.rsqrt(x.var(_dims(x), unbiased=False) + eps)


def gather_stats_with_counts(x, mean, invstd, running_mean, running_var, momentum, eps, counts):
    c = counts.reshape(-1, 1).to(mean.dtype)
    n = c.sum()
    m = (mean * c).sum(0) / n
    var = ((invstd ** -2 - eps + (mean - m) ** 2) * c).sum(0) / n
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(momentum * m.to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(momentum * (var * n / (n - 1)).to(running_var.dtype))
    return m, torch.rsqrt(var + eps)


def elemt(x, w, b, mean, invstd, eps):
    y = (x.float() - mean.reshape(_shape(x))) * (invstd * w).reshape(_shape(x)) + b.reshape(_shape(x))
    return y.to(x.dtype)


def backward_reduce(g, x, mean, invstd, w, input_g, weight_g, bias_g):
    g, x = g.float(), x.float()
    sum_dy, sum_dy_xmu = g.sum(_dims(x)), (g * (x - mean.reshape(_shape(x)))).sum(_dims(x))
    return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd, sum_dy


def backward_elemt(g, x, mean, invstd, w, sum_dy, sum_dy_xmu, count):
    n = count.sum()
    proj = (sum_dy_xmu / n * invstd ** 2).reshape(_shape(x))
    out = ((g.float() - (sum_dy / n).reshape(_shape(x)) - (x.float() - mean.reshape(_shape(x))) * proj)
           * (invstd * w).reshape(_shape(x)))
    return out.to(g.dtype)


def register() -> None:
    global _LIB
    if _LIB is not None:
        return
    _LIB = torch.library.Library("aten", "IMPL")  # kept alive: the registrations last as long as the Library
    for name, fn in (("batch_norm_stats", stats), ("batch_norm_gather_stats_with_counts", gather_stats_with_counts),
                     ("batch_norm_elemt", elemt), ("batch_norm_backward_reduce", backward_reduce),
                     ("batch_norm_backward_elemt", backward_elemt)):
        _LIB.impl(name, fn, "CPU")
