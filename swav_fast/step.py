"""One SwAV optimisation step: normalise prototypes, forward, codes, loss, backward, freeze, LARS, queue push.

train_step (host) turns host integers (the step index against the freeze window, the queue's fill count) into
two booleans; step_core (tensors) does the rest with no `.item()` and no Python branch on a tensor value, so it
never waits for the device and runs eager or as one torch.compile(fullgraph=True) graph with the same numbers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from swav_fast.loss import swapped_prediction_loss
from swav_fast.model import SwAVModel
from swav_fast.optim import LARS
from swav_fast.queue import EmbeddingQueue, block_scores, push_
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
    codes = _codes(scores.detach().float(), z.detach(), prototypes, queue.buffer if queue is not None else None,
                   queue is not None and queue.in_use, crops_for_assign, batch_size, eps, n_iters, process_group,
                   sinkhorn_fn)
    if queue is not None:
        queue.n_pushed += 1
    return codes


@torch.no_grad()
def _codes(scores: torch.Tensor, z: torch.Tensor, prototypes: torch.Tensor, queue: torch.Tensor | None,
           in_use: bool, crops_for_assign: list[int], bs: int, eps: float, n_iters: int,
           process_group: dist.ProcessGroup | None, sinkhorn_fn=sinkhorn) -> list[torch.Tensor]:
    codes = []
    for i, c in enumerate(crops_for_assign):
        out = scores[c * bs:(c + 1) * bs]
        if queue is not None and in_use:
            out = torch.cat((block_scores(queue[i], prototypes), out))
        codes.append(sinkhorn_fn(out, eps, n_iters, process_group)[-bs:])
    if queue is not None:
        # Pushing after all codes equals the official per-crop order: block i's push touches only block i.
        push_(queue, [z[c * bs:(c + 1) * bs] for c in crops_for_assign])
    return codes


def sinkhorn_function(impl: str):
    """The Sinkhorn implementation named by --sinkhorn_impl (both have the reference's signature and numbers)."""
    if impl == "triton":
        from swav_fast.kernels.sinkhorn_triton import sinkhorn_fused

        return sinkhorn_fused
    return sinkhorn


def compiled_step_core(backend: str = "inductor"):
    """step_core as one torch.compile(fullgraph=True) graph: any graph break (a host sync, a Python branch on a
    tensor value) is an error instead of a silent slowdown."""
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):  # lets dynamo trace loss.backward() (torch >= 2.14)
        torch._dynamo.config.trace_autograd_ops = True
    return torch.compile(step_core, fullgraph=True, backend=backend)


def train_step(model: nn.Module, optimizer: LARS, crops: list[torch.Tensor], lr: float, iteration: int, cfg,
               queue: EmbeddingQueue | None = None, process_group: dist.ProcessGroup | None = None,
               autocast: contextlib.AbstractContextManager | None = None, core=None) -> torch.Tensor:
    """Runs one step and returns the loss as a detached device tensor (reading it is the caller's sync).

    The host part decides, from host integers only, whether the queue is in use and whether the prototypes
    are frozen, and keeps the host counters; `core` (step_core, or a torch.compile of it) does the tensor work.
    """
    if optimizer.param_groups[0]["params"][0].grad is None:  # first step, or just resumed
        optimizer.prepare()
    for group in optimizer.param_groups:
        group["lr"] = lr  # host bookkeeping (state_dict); the update reads the device copy below
    lr_t = torch.full((), lr, dtype=torch.float32, device=crops[0].device)
    loss = (core or step_core)(model, optimizer, crops, lr_t, cfg, queue.buffer if queue is not None else None,
                               queue is not None and queue.in_use, iteration < cfg.freeze_prototypes_niters,
                               process_group, autocast or contextlib.nullcontext())
    if queue is not None:
        queue.n_pushed += 1
    return loss


def step_core(model: nn.Module, optimizer: LARS, crops: list[torch.Tensor], lr: torch.Tensor, cfg,
              queue_buffer: torch.Tensor | None, queue_in_use: bool, frozen: bool,
              process_group: dist.ProcessGroup | None, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """The tensor work of one step: a function of static tensors and two host booleans, no host sync."""
    core = unwrap(model)
    core.normalize_prototypes()
    with autocast:
        z, scores = model(crops)
    bs = crops[0].shape[0]
    codes = _codes(scores.detach().float(), z.detach(), core.prototypes.weight.detach(), queue_buffer, queue_in_use,
                   cfg.crops_for_assign, bs, cfg.epsilon, cfg.sinkhorn_iterations, process_group,
                   sinkhorn_function(cfg.sinkhorn_impl))
    loss = swapped_prediction_loss(scores, codes, cfg.crops_for_assign, len(crops), cfg.temperature)

    optimizer.zero_grads_()
    loss.backward()
    if frozen:
        # The official code sets these grads to None. A zero grad gives the same parameters under LARS
        # (||g|| = 0: no LARC scaling, no weight decay; momentum stays 0) and keeps the set of updated
        # tensors the same at every step, which a captured step needs.
        torch._foreach_zero_([p.grad for p in core.prototypes.parameters()])
    optimizer.update(lr)
    return loss.detach()
