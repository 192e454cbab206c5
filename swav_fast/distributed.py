"""torch.distributed from torchrun's environment; the same code runs single-process without it."""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

_joined_a_group = False  # set once this process has joined a process group (see exit_process)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: dist.ProcessGroup | None = None  # a gloo group for host-side decisions (see init_distributed)
    timeout: datetime.timedelta | None = None  # of every group this run makes (None: torch's defaults)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The group to hand to collectives (sinkhorn), None when single-process."""
        return dist.group.WORLD if self.world_size > 1 else None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class DeviceError(RuntimeError):
    """A device this process cannot use as asked (no CUDA, more processes than GPUs): a usage error."""


def cuda_index(local_rank: int, n_visible: int, local_world_size: int = 1, visible_devices: str | None = None) -> int:
    """The GPU of a local rank: its own index when every GPU of the node is visible (torchrun), 0 when each process
    sees one GPU (SLURM with --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per task). Several processes of a node
    (torchrun's LOCAL_WORLD_SIZE) that see the one GPU of an unrestricted machine (no CUDA_VISIBLE_DEVICES) would
    all take it, which NCCL refuses ("Duplicate GPU detected"): said here instead."""
    if n_visible == 1:
        if local_world_size > 1 and visible_devices is None:
            raise DeviceError(f"{local_world_size} processes on this node (torchrun --nproc_per_node), but it has "
                              "one GPU: start one process per GPU (torchrun --nproc_per_node=1), or give each "
                              "process its own GPU through CUDA_VISIBLE_DEVICES")
        return 0
    if local_rank >= n_visible:
        raise DeviceError(f"LOCAL_RANK {local_rank}, but this process sees {n_visible} GPUs: start at most "
                          f"{n_visible} processes per node (torchrun --nproc_per_node={n_visible}), or give each "
                          "process its own GPU through CUDA_VISIBLE_DEVICES")
    return local_rank


def init_distributed(device: str = "auto", timeout_minutes: float = 0.0) -> DistInfo:
    """NCCL on CUDA, gloo on CPU; one CUDA device per local rank. ``device``: auto, cuda or cpu (a rank's GPU is
    its LOCAL_RANK's, so a GPU index is refused rather than read as not-cuda). ``timeout_minutes``: how long a rank
    waits for the others in one collective before it fails with a timeout, for the main group and the gloo control
    group alike (0: torch's defaults, 10 minutes for NCCL and 30 for gloo)."""
    if device not in ("auto", "cuda", "cpu"):
        raise DeviceError(f"device {device!r}: pass auto, cuda or cpu (each rank takes the GPU of its LOCAL_RANK)")
    if not (timeout_minutes >= 0 and timeout_minutes < float("inf")):
        raise DeviceError(f"distributed timeout {timeout_minutes!r} minutes: pass a finite number >= 0 (0: torch's "
                          "defaults)")
    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes > 0 else None
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if use_cuda:
        dev = torch.device("cuda", cuda_index(local, torch.cuda.device_count(),
                                              int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                                              os.environ.get("CUDA_VISIBLE_DEVICES")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    control = None
    if world > 1:
        global _joined_a_group
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                    timeout=timeout)
        _joined_a_group = True
        # Decisions the ranks take together (stop on a signal, a timed checkpoint) are host values: agreeing on
        # them through NCCL would put the collective on the GPU stream and make the host wait for every step
        # queued before it. A gloo group of host tensors agrees without touching the GPU.
        control = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else dist.group.WORLD
    return DistInfo(rank, world, local, dev, control, timeout)


def exit_process(code: int) -> NoReturn:
    """End a script with exit status `code`: sys.exit in a process that never joined a process group; in one that
    did, flush the output and os._exit, which skips the interpreter's teardown. Call it once main() has returned
    (and so has left the group with shutdown(), and freed its locals).

    Why: a collective's work object can outlive the call that waited for it. A gloo worker thread frees it a little
    later, and when that drops the last reference to a tensor whose Python object the tensor still owns, the thread
    needs the GIL. If the main thread has started the interpreter's teardown by then, the thread is ended inside
    C++ code that cannot be unwound: std::terminate, SIGABRT ("terminate called without an active exception"), so
    a rank that finished its work is reported to torchrun as crashed, and may hide the exit status that says why
    the run stopped. Seen on this machine (torch 2.14, gloo, 2 ranks) in 6 of 82 runs of a rank that stops on a
    non-finite loss a millisecond after its last collective (0 of 72 with os._exit); the core dump shows the worker
    thread in ~AsyncAllreduceWork, taking the GIL (pytorch/pytorch#190489 describes the same window).
    destroy_process_group does not stop gloo's threads while Python objects still refer to the group, and freeing
    the group from Python would wait for those threads with the GIL held (see shutdown()). os._exit ends every
    thread at once.

    What the teardown would still have done is done before: the group is left, checkpoints, metrics and exports
    are written and closed by main(), the data loaders are closed with main()'s frame; here the output streams and
    logging's handlers are flushed."""
    if not _joined_a_group:
        sys.exit(code)
    exit_now(code)


def run_main(main) -> NoReturn:
    """A script's end: exit_process(main()). An unexpected exception is printed with its traceback and ends the
    process with status 1 the same way, so that under torchrun it too avoids the teardown abort."""
    try:
        code = main()
    except Exception:  # noqa: BLE001 - reported here, as the interpreter would have
        traceback.print_exc()
        code = 1
    exit_process(code)


def exit_now(code: int) -> NoReturn:
    """os._exit(code) after flushing logging's handlers and the output streams (see exit_process for when)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)


def agree_any(flags: list[bool], info: DistInfo) -> list[bool]:
    """Each flag true on any rank is true on every rank (a host-side all-reduce; no GPU sync)."""
    if info.world_size == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's picklable `obj`, rank by rank, on every rank (through the host-side control group, so no GPU
    stream is waited for); [obj] with one process."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.control)
    return out


def first_disagreement(per_rank: list[dict]) -> str | None:
    """Where the ranks' views of the run differ (`per_rank`: one dict of facts per rank, the same keys), as one
    line naming the first differing fact and the first rank that differs from rank 0; None when all agree."""
    for key in per_rank[0]:
        for rank, facts in enumerate(per_rank[1:], start=1):
            mine, theirs = per_rank[0][key], facts[key]
            if mine == theirs:
                continue
            if isinstance(mine, dict):  # name the differing entries, not the whole dict
                names = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
                shown = ", ".join(f"{k} {mine.get(k)!r} on rank 0, {theirs.get(k)!r} on rank {rank}" for k in names[:3])
                return f"{key}: {shown}"
            return f"{key}: {mine!r} on rank 0, {theirs!r} on rank {rank}"
    return None


def shutdown(model: torch.nn.Module | None = None, graph_step=None) -> None:
    """Leave the process group; pass the DDP-wrapped model, if any, and the GraphStep, if any.

    The GraphStep's captured graph is freed first: NCCL does not destroy a communicator while a live CUDA graph
    holds collectives captured on it, and destroy_process_group would wait forever (pytorch/pytorch#115388).

    DDP's reducer owns a reference to the group. Were it the last owner, the group would be destroyed when the
    reducer is freed, with the GIL held, while a gloo worker thread may still be freeing the Python tensors of a
    finished collective and waiting for the GIL: a deadlock at exit. Seen with torch 2.11 and gloo in 4 of 8
    2-rank CPU runs (rank 1 stuck in ~ProcessGroupGloo's thread join). Dropping the reducer first leaves
    destroy_process_group, which releases the GIL, to free the group.
    """
    if graph_step is not None:
        graph_step.close()
    release_ddp(model)
    if dist.is_initialized():
        dist.destroy_process_group()


def release_ddp(model: torch.nn.Module | None) -> None:
    """Drop a DDP model's reducer (and the logger that holds it too), its reference to the process group; a no-op
    for any other model. The model cannot train after this. See shutdown() for why."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        for name in ("logger", "reducer"):
            if hasattr(model, name):
                delattr(model, name)


def average_gradients_(grads: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Average gradients over the ranks of `group` in place, with one all_reduce; a no-op without a group.

    What DDP does, minus its hooks and buckets, so a step can run it as plain tensor code between backward and
    the optimiser: copy every gradient into one flat buffer (all fp32 here), scale by 1/world (DDP multiplies by
    the same factor before its sum), all-reduce the sum, copy back. No host sync and fixed shapes: torch.compile
    traces it in a full graph (dynamo turns dist.all_reduce into a functional collective; tested on 2 gloo
    ranks), and a CUDA graph can capture it on NCCL >= 2.9.6 (PyTorch's CUDA-graph notes; not yet run on GPUs).
    One buffer rather than DDP's 25 MB buckets: after backward there is no computation left to overlap buckets
    with, so one call per step (ResNet-50 + head + prototypes: 28.4 M values, 113 MB) has the least per-call overhead.
    """
    if group is None:
        return
    if len({g.dtype for g in grads}) != 1:
        raise ValueError(f"average_gradients_ needs one gradient dtype, got {sorted({str(g.dtype) for g in grads})}")
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat.mul_(1.0 / dist.get_world_size(group))
    dist.all_reduce(flat, group=group)
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads,
                                                                     strict=True)])


@torch.no_grad()
def broadcast_module_(module: torch.nn.Module, group: dist.ProcessGroup | None, src: int = 0) -> None:
    """Rank src's parameters and buffers on every rank (what DDP does when it wraps a model); once, at setup."""
    if group is None:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t, src, group=group)


def syncbn_group(info: DistInfo, group_size: int = 0) -> dist.ProcessGroup | None:
    """The process group of this rank's SyncBatchNorm: None (all ranks) for group_size 0, else its group of
    `group_size` consecutive ranks (the bs4096 recipe's 8). Every rank creates every group, in the same order, as
    torch.distributed asks; call it once per run (each call makes new communicators)."""
    if not group_size:
        return None
    groups = [dist.new_group(list(range(s, s + group_size)), timeout=info.timeout)
              for s in range(0, info.world_size, group_size)]
    return groups[info.rank // group_size]


def _average_bucket(group, bucket):  # no annotations: DDP compares them to its classes, and here they are strings
    """DDP communication hook: the bucket (a dist.GradBucket) times 1 / world size, summed over the ranks of
    `group` (None: all), in place. DDP's arithmetic without a hook (it multiplies each gradient by 1 / world size
    on its way into the bucket), once per bucket. Returns the future of the averaged bucket."""
    buffer = bucket.buffer()
    buffer.mul_(1.0 / dist.get_world_size(group))
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def wrap_for_step_mode(model: torch.nn.Module, step_mode: str, info: DistInfo
                       ) -> tuple[torch.nn.Module, dist.ProcessGroup | None]:
    """(the model to train, grad_group) for a step mode on the ranks of `info`.

    eager: DDP with several ranks (its bucketed all-reduce overlaps backward) and grad_group None; compile and
    graph: the bare model, its weights broadcast from rank 0 as DDP does when it wraps, and grad_group the group
    that the step averages the gradients over itself, so that the step stays one graph.

    Three DDP defaults are changed; they leave every number the official run produces as it is (tested
    bit-equal on 2 and 3 ranks) and only drop work:
    - the gradients are views into DDP's buckets (gradient_as_bucket_view): backward accumulates straight into
      the buckets that are all-reduced, instead of each gradient being copied into its bucket and the average
      copied back (a copy per parameter and step, and a second copy of the gradients in memory). It relies on
      the gradients never being replaced, only zeroed in place, which is what the step does;
    - each bucket is multiplied by 1 / world size in one op before its all-reduce (`_average_bucket`) instead of
      each gradient as it is copied into its bucket (the same product of the same values; torch's allreduce_hook
      divides instead, which rounds differently when the world size is not a power of two);
    - the BatchNorm buffers are not broadcast from rank 0 before every forward (forward_sync_buffers, or
      broadcast_buffers before torch 2.14: about 3 copies per buffer and a few collectives per step). Running
      statistics are not used by a training forward, rank 0's own are the same either way, and rank 0's are
      what a checkpoint and the exported trunk hold (with SyncBatchNorm every rank of a group has the same).
      The other ranks' are their own, as in compile and graph modes.
    """
    grad_group = info.group if step_mode != "eager" else None
    if info.world_size > 1 and grad_group is None:
        ddp = torch.nn.parallel.DistributedDataParallel
        sync_buffers = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                        else "broadcast_buffers")
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = ddp(model, device_ids=device_ids, gradient_as_bucket_view=True, **{sync_buffers: False})
        wrapped.register_comm_hook(None, _average_bucket)
        return wrapped, None
    broadcast_module_(model, grad_group)
    return model, grad_group
