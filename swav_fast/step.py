"""One SwAV optimisation step: normalise prototypes, forward, codes, loss, backward, gradient all-reduce, freeze,
LARS, queue push.

train_step (host) turns host integers (the step index against the freeze window, the queue's fill count) into
two booleans; step_core (tensors) does the rest with no `.item()` and no Python branch on a tensor value, so it
never waits for the device and runs eager or as one torch.compile(fullgraph=True) graph with the same numbers.
With several ranks, step_core averages the gradients itself (one all-reduce, `grad_group`) instead of relying
on DDP's backward hooks, so the compiled step stays one graph and a CUDA graph can capture it. GraphStep is
--step_mode graph: the two host decisions become device flags and the whole step is one captured CUDA graph.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.utils._pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from swav_fast.distributed import average_gradients_
from swav_fast.loss import swapped_prediction_loss
from swav_fast.model import SwAVModel
from swav_fast.optim import LARS
from swav_fast.queue import EmbeddingQueue, block_scores, push_
from swav_fast.sinkhorn import sinkhorn
from swav_fast.streams import private_stream


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
           in_use: bool | torch.Tensor, crops_for_assign: list[int], bs: int, eps: float, n_iters: int,
           process_group: dist.ProcessGroup | None, sinkhorn_fn=sinkhorn) -> list[torch.Tensor]:
    """`in_use` is a host bool (eager, compile) or a 0-dim bool device tensor (graph mode): then both codes are
    computed, with and without the queue, and the flag selects one on the device (torch.where picks exactly)."""
    codes = []
    for i, c in enumerate(crops_for_assign):
        out = scores[c * bs:(c + 1) * bs]
        if queue is None or (not isinstance(in_use, torch.Tensor) and not in_use):
            codes.append(sinkhorn_fn(out, eps, n_iters, process_group))
            continue
        with_queue = sinkhorn_fn(torch.cat((block_scores(queue[i], prototypes), out)), eps, n_iters,
                                 process_group)[-bs:]
        if isinstance(in_use, torch.Tensor):
            with_queue = torch.where(in_use, with_queue, sinkhorn_fn(out, eps, n_iters, process_group))
        codes.append(with_queue)
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
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):  # lets dynamo trace loss.backward() (2.11 and 2.14 have it)
        torch._dynamo.config.trace_autograd_ops = True
    return torch.compile(step_core, fullgraph=True, backend=backend)


def step_autocast(device_type: str) -> torch.autocast:
    """bf16 autocast as the step runs it in every mode: with autocast's weight-cast cache off.

    The trunk runs once per crop resolution, so each weight is used twice in a step. With the cache, both uses share
    one bf16 copy of the weight, and backward adds their two gradients in bf16 before casting the sum to fp32;
    without it, each use has its own cast and the two gradients are added in fp32. A captured graph needs the cache
    off (make_graphed_callables requires it) and a torch.compile'd step has no cache, so an eager step with the
    cache would give other numbers than the graph and compiled steps, and a less exact sum. The cost is one more
    cast of each weight per step. train_step refuses an autocast with the cache on."""
    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)


def train_step(model: nn.Module, optimizer: LARS, crops: list[torch.Tensor], lr: float, iteration: int, cfg,
               queue: EmbeddingQueue | None = None, process_group: dist.ProcessGroup | None = None,
               autocast: contextlib.AbstractContextManager | None = None, core=None,
               grad_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Runs one step and returns the loss as a detached device tensor (reading it is the caller's sync).

    The host part decides, from host integers only, whether the queue is in use and whether the prototypes
    are frozen, and keeps the host counters; `core` (step_core, or a torch.compile of it) does the tensor work,
    or, if it is a GraphStep, replays the captured step. `grad_group`: average the gradients over its ranks
    inside the step (for a model not wrapped in DDP); None with DDP or with one process.
    """
    if grad_group is not None and isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("grad_group averages the gradients inside the step; a DDP model already averages them")
    if isinstance(autocast, torch.autocast) and autocast._cache_enabled:
        raise ValueError("the step's autocast must have its weight-cast cache off (cache_enabled=False), or the "
                         "eager step gives other numbers than the graph and compiled ones: use "
                         "swav_fast.step.step_autocast")
    if optimizer.param_groups[0]["params"][0].grad is None:  # first step, or just resumed
        optimizer.prepare()  # grads and momentum made here, so a GraphStep's pool never holds them
    for group in optimizer.param_groups:
        group["lr"] = lr  # host bookkeeping (state_dict); the update reads the device copy below
    if isinstance(core, GraphStep):
        return core(model, optimizer, crops, lr, iteration, cfg, queue, process_group, autocast, grad_group)
    autocast = autocast or contextlib.nullcontext()
    lr_t = torch.full((), lr, dtype=torch.float32, device=crops[0].device)
    loss = (core or step_core)(model, optimizer, crops, lr_t, cfg, queue.buffer if queue is not None else None,
                               queue is not None and queue.in_use, iteration < cfg.freeze_prototypes_niters,
                               process_group, autocast, grad_group)
    if queue is not None:
        queue.n_pushed += 1
    return loss


def step_core(model: nn.Module, optimizer: LARS, crops: list[torch.Tensor], lr: torch.Tensor, cfg,
              queue_buffer: torch.Tensor | None, queue_in_use: bool | torch.Tensor, frozen: bool | torch.Tensor,
              process_group: dist.ProcessGroup | None, autocast: contextlib.AbstractContextManager,
              grad_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The tensor work of one step: a function of static tensors and two flags, no host sync.

    The flags are host bools (a torch.compile graph specialises on them) or 0-dim bool device tensors (one
    CUDA graph serves every phase). `grad_group`: the gradients are averaged over its ranks after backward.
    """
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
    average_gradients_([p.grad for g in optimizer.param_groups for p in g["params"]], grad_group)
    # The official code sets these grads to None. A zero grad gives the same parameters under LARS
    # (||g|| = 0: no LARC scaling, no weight decay; momentum stays 0) and keeps the set of updated
    # tensors the same at every step, which a captured step needs.
    proto_grads = [p.grad for p in core.prototypes.parameters()]
    if isinstance(frozen, torch.Tensor):
        for g in proto_grads:
            g.masked_fill_(frozen, 0.0)
    elif frozen:
        torch._foreach_zero_(proto_grads)
    optimizer.update(lr)
    return loss.detach()


class GraphStep:
    """--step_mode graph: forward, backward, gradient all-reduce, LARS update and queue push as one CUDA graph.

    The host side is this small class: static input buffers that each step's crops are copied into, the
    learning rate and the two host decisions (queue in use, prototypes frozen) as 0-dim device tensors filled
    before each replay (fill_ with a host scalar: a kernel argument, no sync), and the host counters. The
    first `warmup` steps run step_core eagerly on a side stream (real training steps on real data, as in the
    PyTorch docs' whole-network capture: cuDNN/cuBLAS and the allocator settle before capture), the next one
    is captured and then replayed, every later step is copy-in + replay. A new queue (created at
    epoch_queue_starts), model, optimiser, group or crop shape starts over: warm-up, capture (a second capture
    per run at most, in train.py).

    Flags rather than one graph per phase: one capture and one private memory pool (each pool holds a whole
    step's activations), and the phase changes (end of the freeze window, queue filling up) happen mid-run with
    no extra warm-up; the cost is computing the codes with and without the queue every step (the smaller
    Sinkhorn is a few % of the larger one) and a masked_fill on the prototype gradient.

    capture=False runs the same logic on any device (CPU tests) with an emulated graph (RecordedGraph): the
    capture records the step's ATen ops and leaves no trace, each replay runs the recorded ops again on the same
    tensors, and the Python of the step does not run at replay, so a host value read at capture stays as it was,
    as in a real graph. Autocast comes with its weight-cast cache off (step_autocast; train_step checks), as
    make_graphed_callables requires too.
    """

    def __init__(self, capture: bool = True, warmup: int = 3):
        self.capture, self.warmup = capture, warmup
        self.n_captures = 0  # graphs captured (or, with capture=False, recorded) so far
        self._bound: tuple | None = None
        self._replay = None
        self._stream: torch.cuda.Stream | None = None  # warm-up and capture (_side_stream)
        self._crops: list[torch.Tensor] = []  # static inputs, made by _start

    def __call__(self, model: nn.Module, optimizer: LARS, crops: list[torch.Tensor], lr: float, iteration: int, cfg,
                 queue: EmbeddingQueue | None, process_group: dist.ProcessGroup | None,
                 autocast: contextlib.AbstractContextManager | None, grad_group: dist.ProcessGroup | None
                 ) -> torch.Tensor:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("GraphStep needs the bare model (it all-reduces the gradients itself, pass grad_group)")
        if self.capture and crops[0].device.type != "cuda":
            raise ValueError(f"GraphStep captures CUDA graphs; the crops are on {crops[0].device}")
        bound = (model, optimizer, cfg, queue, queue.buffer if queue is not None else None, process_group,
                 grad_group, autocast, tuple((c.shape, c.stride(), c.dtype, c.device) for c in crops))
        if (self._bound is None or bound[-1] != self._bound[-1]
                or any(a is not b for a, b in zip(bound[:-1], self._bound[:-1], strict=True))):
            self._start(bound, crops, autocast)
        for static, c in zip(self._crops, crops, strict=True):
            static.copy_(c)
        self._lr.fill_(lr)
        self._in_use.fill_(queue is not None and queue.in_use)
        self._frozen.fill_(iteration < cfg.freeze_prototypes_niters)
        if self._replay is not None:
            self._replay()
        elif self._n_warm < self.warmup:
            self._warm_step()
        else:
            self._capture()
            self._replay()
        if queue is not None:
            queue.n_pushed += 1
        return self._loss.clone()  # the graph's output tensor is overwritten by the next replay

    def close(self) -> None:
        """Free the captured graph and its memory pool; a later call starts over (warm-up, capture).

        Call it before torch.distributed.destroy_process_group: NCCL does not destroy a communicator while a live
        CUDA graph holds collectives captured on it, so destroy_process_group would wait forever
        (pytorch/pytorch#115388, open)."""
        if self.capture and self._replay is not None:
            torch.cuda.synchronize()  # no replay in flight when the graph goes
        self._replay = self._loss = None
        self._bound = None
        self._crops = []  # the static inputs go too (three crop-sized buffers)

    def _start(self, bound: tuple, crops: list[torch.Tensor], autocast) -> None:
        self._replay = self._loss = None  # frees the previous graph and its pool
        self._bound = bound
        self._crops = [torch.empty_like(c) for c in crops]  # same shape, strides (channels_last) and device
        device = crops[0].device
        self._lr = torch.zeros((), dtype=torch.float32, device=device)
        self._in_use = torch.zeros((), dtype=torch.bool, device=device)
        self._frozen = torch.zeros((), dtype=torch.bool, device=device)
        self._autocast = autocast or contextlib.nullcontext()
        self._n_warm = 0

    def _body(self) -> torch.Tensor:
        model, optimizer, cfg, _, buffer, process_group, grad_group, _, _ = self._bound
        return step_core(model, optimizer, self._crops, self._lr, cfg, buffer, self._in_use, self._frozen,
                         process_group, self._autocast, grad_group)

    def _warm_step(self) -> None:
        self._n_warm += 1
        if not self.capture:
            self._loss = self._body()
            return
        side = self._side_stream()  # as the PyTorch docs warm up before capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._loss = self._body()
        torch.cuda.current_stream().wait_stream(side)

    def _side_stream(self) -> torch.cuda.Stream:
        """The stream of the warm-up steps and the capture, one for the object's life: a stream no loader thread is
        handed (swav_fast.streams), and memory the warm-up frees on it is reused by the next warm-up step."""
        if self._stream is None:
            self._stream = private_stream()
        return self._stream

    def _capture(self) -> None:
        self.n_captures += 1
        if not self.capture:
            graph = RecordedGraph()
            with graph:
                self._loss = self._body()
            graph.undo()
            self._replay = graph.replay
            return
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's threads may pin host memory (cudaHostAlloc) meanwhile, which "global" capture
        # turns into an error in those threads; the step's own kernels (backward's included) are captured anyway,
        # capture follows the stream
        with torch.cuda.graph(graph, stream=self._side_stream(), capture_error_mode="thread_local"):
            self._loss = self._body()
        self._replay = graph.replay


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


class RecordedGraph(TorchDispatchMode):
    """A CUDA graph's semantics on any device, for GraphStep(capture=False): what runs inside `with graph:` is
    recorded as a list of ATen ops (the autograd engine's backward ops included), then `undo()` puts back every
    tensor that existed before and was changed (a real capture runs no kernel), and `replay()` runs the recorded
    ops again on the same tensors, each result written into the tensor the capture made. Host values are frozen
    as they were at capture (scalars in the recorded arguments; Python branches are not re-run), so a step that
    reads a host value it should read from a device tensor gives other numbers than eager. Collectives are
    recorded as ops too; replay waits for each (a CUDA graph orders them on the stream)."""

    def __init__(self):
        super().__init__()
        self._ops: list[tuple] = []
        self._made: set[int] = set()  # ids of the tensors made during capture (kept alive by _ops)
        self._before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # older tensors: (tensor, their values)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            if id(t) not in self._made and id(t) not in self._before:
                self._before[id(t)] = (t, t.detach().clone())  # before this op can change it
        out = func(*args, **kwargs)
        self._made.update(id(t) for t in _tensors(out))
        self._ops.append((func, args, kwargs, out))
        return out

    @torch.no_grad()
    def undo(self) -> None:
        for t, values in self._before.values():
            t.copy_(values)
        self._before.clear()

    @torch.no_grad()
    def replay(self) -> None:
        for func, args, kwargs, out in self._ops:
            leaves = torch.utils._pytree.tree_leaves(func(*args, **kwargs))
            for leaf in leaves:
                if not isinstance(leaf, torch.Tensor) and hasattr(leaf, "wait"):
                    leaf.wait()  # a collective's work handle
            fresh_tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            for old, fresh in zip(_tensors(out), fresh_tensors, strict=True):
                if fresh is not old:
                    old.copy_(fresh)
