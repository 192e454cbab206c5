"""One SwAV optimisation step (eager mode): normalise prototypes, forward, codes, loss, backward, freeze, LARS.

No `.item()` and no Python branch on a tensor value: the only branches are on host integers (the step
index against the freeze window, the queue's host-side fill count), so the step never waits for the device.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from swav_fast.loss import swapped_prediction_loss
from swav_fast.model import SwAVModel
from swav_fast.queue import EmbeddingQueue
from swav_fast.sinkhorn import sinkhorn


def unwrap(model: nn.Module) -> SwAVModel:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def assignment_codes(scores: torch.Tensor, z: torch.Tensor, prototypes: torch.Tensor, queue: EmbeddingQueue | None,
                     crops_for_assign: list[int], batch_size: int, eps: float, n_iters: int,
                     process_group: dist.ProcessGroup | None = None, sinkhorn_fn=sinkhorn) -> list[torch.Tensor]:
    """Codes q [B, K] for every assignment crop; pushes this batch's embeddings into the queue.

    With the queue in use, its scores (recomputed with the current prototypes) are prepended so that
    Sinkhorn spreads the batch over more samples; only the batch rows' codes are returned (REFERENCE section 3).
    """
    bs = batch_size
    scores = scores.detach().float()
    codes = []
    for i, c in enumerate(crops_for_assign):
        out = scores[c * bs:(c + 1) * bs]
        if queue is not None and queue.in_use:
            out = torch.cat((queue.scores(i, prototypes), out))
        codes.append(sinkhorn_fn(out, eps, n_iters, process_group)[-bs:])
    if queue is not None:
        # Pushing after all codes equals the official per-crop order: block i's push touches only block i.
        queue.push([z[c * bs:(c + 1) * bs].detach() for c in crops_for_assign])
    return codes


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, crops: list[torch.Tensor], lr: float,
               iteration: int, cfg, queue: EmbeddingQueue | None = None,
               process_group: dist.ProcessGroup | None = None,
               autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Runs one step and returns the loss as a detached device tensor (reading it is the caller's sync)."""
    core = unwrap(model)
    core.normalize_prototypes()
    with autocast or contextlib.nullcontext():
        z, scores = model(crops)
    bs = crops[0].shape[0]
    codes = assignment_codes(scores, z, core.prototypes.weight, queue, cfg.crops_for_assign, bs, cfg.epsilon,
                             cfg.sinkhorn_iterations, process_group)
    loss = swapped_prediction_loss(scores, codes, cfg.crops_for_assign, len(crops), cfg.temperature)

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if iteration < cfg.freeze_prototypes_niters:
        # The official code sets these grads to None. A zero grad gives the same parameters under LARS
        # (||g|| = 0: no LARC scaling, no weight decay; momentum stays 0) and keeps the set of updated
        # tensors the same at every step, which a captured step needs.
        for p in core.prototypes.parameters():
            p.grad.zero_()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss.detach()
