"""Sinkhorn-Knopp equipartition codes (REFERENCE section 2), the pure-torch reference.

The fused Triton kernel in swav_fast/kernels/ has the same signature and is tested equal to this.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3,
             process_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Codes [B_local, K] for scores [B_local, K]; each row sums to 1, each prototype gets 1/K of the mass.

    With a process group the batch is the concatenation over its ranks: the total and the per-prototype
    (row) sums are all-reduced; per-sample (column) sums stay local. Always computed in fp32: exp(1/eps)
    = exp(20) overflows fp16 and loses too much in bf16. No max-subtraction, as the official default.
    """
    q = torch.exp(scores.float() / eps).t()  # K x B_local
    world = dist.get_world_size(process_group) if process_group is not None else 1
    n_cols = q.shape[1] * world
    n_rows = q.shape[0]

    total = q.sum()
    if process_group is not None:
        dist.all_reduce(total, group=process_group)
    q /= total
    for _ in range(n_iters):
        row_sums = q.sum(dim=1, keepdim=True)
        if process_group is not None:
            dist.all_reduce(row_sums, group=process_group)
        q /= row_sums
        q /= n_rows
        q /= q.sum(dim=0, keepdim=True)
        q /= n_cols
    q *= n_cols
    return q.t()
