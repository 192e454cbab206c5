"""Step profiler: our step in each mode beside an official-style eager step, on synthetic inputs of real shapes.

    python tools/profile_step.py --device cuda                      # ResNet-50, 64 images, 2x224 + 6x96
    python tools/profile_step.py --device cpu --arch resnet18 --batch 8 --sizes 64 32 --steps 3
    torchrun --nproc_per_node=4 tools/profile_step.py   # 4 GPUs: SyncBN, gradient all-reduce, distributed Sinkhorn

First Sinkhorn alone at K 3000 x B 3904 (the queue path), reference vs the fused Triton kernel (CUDA only), so
that a time limit in a slow mode (compile) does not cost that figure. Then for each mode: time per step (CUDA
events after warm-up on GPU, wall clock on CPU), samples/s, host syncs per step (on CPU: ops that hand a tensor
value to Python, counted by a dispatch mode; on CUDA: the synchronizing calls that torch.cuda.set_sync_debug_mode
reports, which also sees what no ATen op shows, e.g. a blocking copy inside a kernel, and the compiled step), ATen
ops dispatched per step (a proxy for kernel launches), peak memory on CUDA, achieved TFLOP/s (the step's forward
+ backward FLOPs counted by torch's FlopCounterMode) and MFU against the GPU's dense bf16 peak. The JSON is
rewritten after Sinkhorn and after every mode ("partial" until the end).
Modes: official, eager, compile (torch.compile, inductor), and on CUDA graph (GraphStep: the whole step as one
captured CUDA graph; its ATen ops are the host-side copy-in of the crops, lr and flag fills and the loss clone,
while the step's kernels go out in one graph launch). The graph mode is UNVERIFIED: written without a GPU and not
yet run on one (tools/gpu_suite.sh runs it).
The official-style step is facebookresearch/swav's loop body: a Python `if` on the queue's last row, apex
LARC's `if` on two norms per parameter, prototype grads set to None, `loss.item()` every step.

Under torchrun every rank runs the same steps as in train.py: the official-style step with torch's
SyncBatchNorm (the bs256 recipe's `--sync_bn pytorch`) and DDP; eager with swav_fast's SyncBatchNorm and DDP;
compile and graph with swav_fast's SyncBatchNorm and the step's own gradient all-reduce; every Sinkhorn over the
process group (`--no-sync_bn`: plain BatchNorm; SyncBatchNorm only on CUDA, as train.py). `--batch` is per rank
and `--queue` the global queue length (each rank holds its share, as in training). A step's time is the slowest
rank's median; samples/s is per GPU and for all of them. Rank 0 prints and writes the JSON. A mode that fails
(or Sinkhorn alone) on one rank stops every rank (with one process the other modes still run and the failure is a
row).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swav_fast.config import Config, trimmed_queue_length  # noqa: E402
from swav_fast.distributed import (  # noqa: E402
    DistInfo,
    exit_now,
    gather_objects,
    init_distributed,
    release_ddp,
    run_main,
    shutdown,
    syncbn_group,
    world_size_from_env,
    wrap_for_step_mode,
)
from swav_fast.loss import swapped_prediction_loss  # noqa: E402
from swav_fast.model import SwAVModel  # noqa: E402
from swav_fast.optim import LARS  # noqa: E402
from swav_fast.queue import EmbeddingQueue  # noqa: E402
from swav_fast.sinkhorn import sinkhorn  # noqa: E402
from swav_fast.step import GraphStep, compiled_step_core, step_autocast, train_step  # noqa: E402
from swav_fast.syncbn import convert_sync_batchnorm  # noqa: E402

# Ops whose result must reach the host (a CPU-GPU sync on CUDA): scalar reads and data-dependent shapes; and
# lift_fresh, a tensor made from Python data (torch.tensor, indexing with a list): on CUDA it is then copied from
# pageable host memory, a blocking copy that also cannot be captured in a CUDA graph.
# And indexing with a boolean mask (index, index_put_: `x[mask]`, `x[mask] = v`), whose kernel turns the mask into
# indices with nonzero inside it, where a dispatch mode does not see that nonzero: counted as "index (bool mask)".
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2", "repeat_interleave",
            "lift_fresh", "index (bool mask)"}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched, and separately the host-sync ones and the collectives (c10d ops: the
    Sinkhorn's all-reduces, the step's gradient all-reduce, DDP's bucket all-reduces and buffer broadcasts)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.collectives = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.collectives += func.namespace == "c10d"
        if name in _INDEX_OPS and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
            name = "index (bool mask)"
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(n for name, n in self.ops.items() if name in SYNC_OPS)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_cuda_syncs(fn) -> int:
    """How many synchronizing CUDA calls `fn()` makes, as torch.cuda.set_sync_debug_mode("warn") reports them (one
    warning each; the autograd engine's thread hands its warnings to the caller's)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


class OfficialStep:
    """main_swav.py's loop body with apex LARC(SGD), for comparison; same numbers as ours, more host syncs."""

    def __init__(self, model: SwAVModel | torch.nn.parallel.DistributedDataParallel, cfg: Config,
                 queue: torch.Tensor | None, group=None):
        self.model, self.cfg, self.queue, self.group = model, cfg, queue, group
        self.bare = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        self.sgd = torch.optim.SGD(model.parameters(), lr=cfg.base_lr, momentum=cfg.momentum)
        self.use_the_queue = False

    def __call__(self, crops: list[torch.Tensor], lr: float, iteration: int, autocast) -> float:
        model, cfg = self.model, self.cfg
        with torch.no_grad():
            self.bare.prototypes.weight.copy_(F.normalize(self.bare.prototypes.weight, dim=1, p=2))
        with autocast:
            z, scores = model(crops)
        bs = crops[0].shape[0]
        codes = []
        with torch.no_grad():
            for i, c in enumerate(cfg.crops_for_assign):
                out = scores[c * bs:(c + 1) * bs].detach().float()
                if self.queue is not None:
                    if self.use_the_queue or not torch.all(self.queue[i, -1, :] == 0):  # host sync
                        self.use_the_queue = True
                        out = torch.cat((self.queue[i] @ self.bare.prototypes.weight.t(), out))
                    self.queue[i, bs:] = self.queue[i, :-bs].clone()
                    self.queue[i, :bs] = z[c * bs:(c + 1) * bs].detach()
                codes.append(sinkhorn(out, cfg.epsilon, cfg.sinkhorn_iterations, self.group)[-bs:])
        loss = swapped_prediction_loss(scores, codes, cfg.crops_for_assign, len(crops), cfg.temperature)
        self.sgd.zero_grad()
        loss.backward()
        if iteration < cfg.freeze_prototypes_niters:
            self.bare.prototypes.weight.grad = None
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is None:
                    continue
                p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                if p_norm != 0 and g_norm != 0:  # two host syncs per parameter
                    local = cfg.lars_trust * p_norm / (g_norm + p_norm * cfg.wd + 1e-8)
                    p.grad += cfg.wd * p
                    p.grad *= local
        for group in self.sgd.param_groups:
            group["lr"] = lr
        self.sgd.step()
        return loss.item()  # host sync


def synthetic_crops(batch: int, sizes: list[int], counts: list[int], device: torch.device,
                    seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g).to(device).contiguous(memory_format=torch.channels_last)
            for s, n in zip(sizes, counts, strict=True) for _ in range(n)]


def time_ms(call, on_cuda: bool) -> float:
    """Milliseconds of one call: CUDA events around it on GPU (then a sync), wall clock on CPU."""
    if on_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    call()
    return (time.perf_counter() - t) * 1e3


def profile(mode: str, cfg: Config, info: DistInfo, batch: int, steps: int, warmup: int,
            bn_group: torch.distributed.ProcessGroup | None = None) -> dict:
    """One mode on this rank: its figures, times as this rank measured them (main() takes the slowest rank's).
    With several CUDA ranks and cfg.sync_bn, SyncBatchNorm over `bn_group` (None: all ranks)."""
    device = info.device
    torch.manual_seed(0)
    on_cuda = device.type == "cuda"
    if on_cuda:
        # A graph replay allocates nothing (its private pool was filled at capture): its peak is taken over the
        # whole run, warm-up and capture included; the other modes' peak over the timed steps, as before.
        torch.cuda.reset_peak_memory_stats()
    model = SwAVModel(cfg.arch, cfg.hidden_mlp, cfg.feat_dim, cfg.nmb_prototypes)
    if info.world_size > 1 and cfg.sync_bn and on_cuda:  # as train.py: SyncBatchNorm needs CUDA
        convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm if mode == "official" else convert_sync_batchnorm
        model = convert(model, bn_group)
    model = model.to(device)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # as train.py and the official main_swav.py
    crops = synthetic_crops(batch, cfg.size_crops, cfg.nmb_crops, device, seed=info.rank)
    if not on_cuda:
        crops = [c.contiguous() for c in crops]
    autocast = step_autocast("cuda") if on_cuda else contextlib.nullcontext()
    # a full queue, so the queue path (the larger Sinkhorn) is what gets timed; each rank holds its share
    queue = None
    rows_per_rank = trimmed_queue_length(cfg, info.world_size) // info.world_size
    if rows_per_rank:
        queue = EmbeddingQueue(len(cfg.crops_for_assign), rows_per_rank, cfg.feat_dim, batch, device)
        queue.buffer.copy_(F.normalize(torch.randn_like(queue.buffer), dim=-1))
        queue.n_pushed = rows_per_rank // batch
    core = None
    if mode == "official":
        if info.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
        official = OfficialStep(model, cfg, None if queue is None else queue.buffer, info.group)
        run = lambda it: official(crops, 0.1, it, autocast)  # noqa: E731
    else:
        model, grad_group = wrap_for_step_mode(model, mode, info)
        optimizer = LARS(model.parameters(), lr=0.1, momentum=cfg.momentum, weight_decay=cfg.wd,
                         trust_coefficient=cfg.lars_trust)
        core = compiled_step_core() if mode == "compile" else GraphStep() if mode == "graph" else None
        run = lambda it: train_step(model, optimizer, crops, 0.1, it, cfg, queue, info.group, autocast,  # noqa: E731
                                    core, grad_group)
        if mode == "graph":  # its own warm-up steps, then the capture: the counted and timed steps are replays
            warmup = max(warmup, core.warmup + 1)
    try:
        # iterations past the freeze window: the steady state
        it0 = cfg.freeze_prototypes_niters
        for i in range(warmup):
            run(it0 + i)
        # One counted step. Its ATen ops by a dispatch mode, which cannot run inside a compiled graph (the compiled
        # step is the same ops as eager, fused, and fullgraph=True already proves it has no host sync); on CUDA also
        # the driver's view of its syncs, the compiled step's included.
        counter = OpCounter() if mode != "compile" else None
        cuda_syncs = None
        if counter is not None or on_cuda:
            with counter if counter is not None else contextlib.nullcontext():
                if on_cuda:
                    cuda_syncs = count_cuda_syncs(lambda: run(it0 + warmup))
                else:
                    run(it0 + warmup)
        times = []
        if on_cuda:
            torch.cuda.synchronize()
            if mode != "graph":
                torch.cuda.reset_peak_memory_stats()
        for i in range(steps):
            times.append(time_ms(lambda i=i: run(it0 + warmup + 1 + i), on_cuda))
    finally:
        if mode == "graph":
            core.close()  # frees the graph, and any collectives captured in it, before the group goes
        release_ddp(model)
    ms = statistics.median(times)
    return {"mode": mode, "ms_per_step": ms, "ms_min": min(times), "samples_per_s": batch / ms * 1e3,
            "host_syncs_per_step": cuda_syncs if on_cuda else counter.syncs if counter else None,
            "aten_ops_per_step": counter.total if counter else None,
            "collectives_per_step": counter.collectives if counter else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
            "trials": steps, "device": torch.cuda.get_device_name() if on_cuda else "cpu"}


def slowest_rank(per_rank: list[dict], world_size: int) -> dict:
    """One row from every rank's row of a mode: the slowest rank's step time (the others wait for it at the
    collectives), the largest peak memory, rank 0's counts; samples/s per GPU and, for all ranks, in total."""
    failed = [r for r in per_rank if "error" in r]
    if failed:  # one process (under torchrun a rank whose mode fails stops every rank before this)
        return failed[0]
    row = dict(max(per_rank, key=lambda r: r["ms_per_step"]))
    row.update({k: per_rank[0][k] for k in ("host_syncs_per_step", "aten_ops_per_step", "collectives_per_step")})
    if row["peak_mem_gib"] is not None:
        row["peak_mem_gib"] = max(r["peak_mem_gib"] for r in per_rank)
    row["ms_min"] = max(r["ms_min"] for r in per_rank)
    row["world_size"] = world_size
    row["samples_per_s_total"] = row["samples_per_s"] * world_size
    return row


# Dense bf16 tensor-core peaks (vendor figures, no sparsity) for the MFU estimate, by a substring of the device name.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def step_flops(cfg: Config, device: torch.device, batch: int) -> int:
    """FLOPs of one step's forward and backward (trunk, head, prototypes), counted by torch's FlopCounterMode on a
    real forward + backward; Sinkhorn, loss and LARS are elementwise and below 0.1 % of it."""
    from torch.utils.flop_counter import FlopCounterMode

    model = SwAVModel(cfg.arch, cfg.hidden_mlp, cfg.feat_dim, cfg.nmb_prototypes).to(device)
    crops = synthetic_crops(batch, cfg.size_crops, cfg.nmb_crops, device)
    with FlopCounterMode(display=False) as counter:
        z, scores = model(crops)
        (z.float().sum() + scores.float().sum()).backward()
    return counter.get_total_flops()


def failure(e: Exception) -> str:
    """The `error` entry of a row whose measurement failed (the others still run and are reported)."""
    return f"{type(e).__name__}: {str(e)[:500]}"


def time_sinkhorn(device: torch.device, k: int, b: int, eps: float, n_iters: int, reps: int,
                  group: torch.distributed.ProcessGroup | None = None) -> list[dict]:
    """Sinkhorn alone on [b, k] scores: the reference (a chain of torch ops) and, on CUDA, the fused Triton kernel;
    on CUDA each also replayed from a captured CUDA graph (the device time without the host's launch cost, which
    at ~0.1 ms is a large part of an eager call; in --step_mode graph the step replays it so). With a group, the
    distributed variant on every rank (b rows each, all-reduced sums)."""
    from swav_fast.step import sinkhorn_function

    g = torch.Generator(device="cpu").manual_seed(0)
    z = F.normalize(torch.randn(b, 128, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 128, generator=g), dim=1)
    scores = (z @ c.T).to(device)
    out = []
    for impl in ["reference"] + (["triton"] if device.type == "cuda" else []):
        fn = sinkhorn_function(impl)
        try:
            for _ in range(3):
                fn(scores, eps, n_iters, group)
            times = [time_ms(lambda fn=fn: fn(scores, eps, n_iters, group), device.type == "cuda")
                     for _ in range(reps)]
        except Exception as e:  # noqa: BLE001  (reported; the other figures stand)
            if group is not None:
                raise  # the other ranks may be waiting in its all-reduces: the caller stops every rank
            out.append({"impl": impl, "k": k, "b": b, "error": failure(e)})
            continue
        out.append({"impl": impl, "k": k, "b": b, "ms": statistics.median(times), "ms_min": min(times)})
        if device.type == "cuda":  # the device time alone: launches replayed from a CUDA graph, no host overhead
            try:
                graph = torch.cuda.CUDAGraph()
                # thread_local, as GraphStep: NCCL's watchdog thread may query events while this one captures
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    fn(scores, eps, n_iters, group)
                times = [time_ms(graph.replay, True) for _ in range(reps)]
                del graph  # before the group goes (pytorch/pytorch#115388)
            except Exception as e:  # noqa: BLE001
                if group is not None:
                    raise
                out.append({"impl": f"{impl} (CUDA graph)", "k": k, "b": b, "error": failure(e)})
                continue
            out.append({"impl": f"{impl} (CUDA graph)", "k": k, "b": b, "ms": statistics.median(times),
                        "ms_min": min(times)})
    return out


IMAGENET_TRAIN_IMAGES = 1_281_167


def slowest_sinkhorn(per_rank: list[list[dict]]) -> list[dict]:
    """Sinkhorn-alone rows from every rank: the slowest rank's time per implementation, or the first error."""
    rows = []
    for same in zip(*per_rank, strict=True):
        failed = [r for r in same if "error" in r]
        rows.append(failed[0] if failed else max(same, key=lambda r: r["ms"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=64, help="images per step (per GPU)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    p.add_argument("--counts", type=int, nargs="+", default=[2, 6])
    p.add_argument("--prototypes", type=int, default=3000)
    p.add_argument("--queue", type=int, default=3840,
                   help="queue rows over all ranks, as --queue_length of train.py (0: none)")
    p.add_argument("--modes", nargs="+", default=None, choices=("official", "eager", "compile", "graph"),
                   help="default: all of them (graph only on CUDA)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sinkhorn_impl", choices=("reference", "triton"), default=None,
                   help="Sinkhorn of our modes (default: triton on CUDA, reference on CPU); the official-style step "
                        "always runs the unfused reference")
    p.add_argument("--sinkhorn-shape", type=int, nargs=2, default=[3000, 3904], metavar=("K", "B"),
                   help="Sinkhorn alone is timed on B x K scores per rank (default: K 3000, 3840 queue rows + 64)")
    p.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=True,
                   help="under torchrun on CUDA: SyncBatchNorm, as the recipes (default); --no-sync_bn: plain BN")
    p.add_argument("--sync_bn_group_size", type=int, default=0,
                   help="ranks per SyncBatchNorm group (0: all ranks; the bs4096 recipe uses 8)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if args.modes is None:
        # compile last: the slowest to prepare (minutes of inductor on ResNet-50), so a time limit costs only it
        args.modes = ["official", "eager"] + (["graph"] if args.device == "cuda" else []) + ["compile"]
    if "graph" in args.modes and args.device != "cuda":
        p.error("--modes graph captures a CUDA graph and needs --device cuda")
    world = world_size_from_env()
    if args.sync_bn_group_size < 0 or (args.sync_bn_group_size and world % args.sync_bn_group_size):
        p.error(f"--sync_bn_group_size {args.sync_bn_group_size} must be 0 or divide the number of ranks ({world})")
    cfg = Config(arch=args.arch, nmb_crops=args.counts, size_crops=args.sizes, nmb_prototypes=args.prototypes,
                 min_scale_crops=[0.5] * len(args.sizes), max_scale_crops=[1.0] * len(args.sizes),
                 queue_length=args.queue, batch_size=args.batch, freeze_prototypes_niters=0,
                 sinkhorn_impl=args.sinkhorn_impl or ("triton" if args.device == "cuda" else "reference"),
                 sync_bn=args.sync_bn, sync_bn_group_size=args.sync_bn_group_size)
    if cfg.sinkhorn_impl == "triton" and args.device != "cuda":
        p.error("--sinkhorn_impl triton needs --device cuda")
    try:
        info = init_distributed(args.device)
    except RuntimeError as e:
        p.error(str(e))
    try:
        return run(args, cfg, info)
    finally:
        shutdown()


def stop_every_rank(what: str, info: DistInfo, e: Exception) -> NoReturn:
    """Under torchrun, a measurement that failed on this rank: the other ranks may be waiting in one of its
    collectives, and the next measurement's collectives would not match theirs; leaving the group could wait for
    them too. Exit now: torchrun then stops the other ranks of this machine (on other machines, their collectives
    time out). Rank 0's JSON keeps what was measured before."""
    traceback.print_exc()
    print(f"{what} failed on rank {info.rank}: {type(e).__name__}: {e}; stopping every rank",
          file=sys.stderr)
    exit_now(1)


def print_table(args: argparse.Namespace, cfg: Config, info: DistInfo, rows: list[dict], device_name: str,
                queue_rows: int, say) -> tuple[float | None, float | None]:
    """Rank 0: the modes' table (with TFLOP/s and MFU added to `rows`) and, for the ImageNet model and crops, the
    epoch-time projection; returns (FLOPs per step or None, the GPU's peak or None)."""
    device, world = info.device, info.world_size
    ok = [r for r in rows if "error" not in r]
    say("counting FLOPs ...")
    try:
        flops = step_flops(cfg, device, args.batch)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: the timings stand without TFLOP/s and MFU
        say(f"counting FLOPs failed: {type(e).__name__}: {e}")
        flops = None
    peak = peak_flops(device_name) if device.type == "cuda" else None
    for r in ok:
        r["tflops_per_s"] = flops / (r["ms_per_step"] / 1e3) / 1e12 if flops else None
        r["mfu"] = r["tflops_per_s"] * 1e12 / peak if peak and flops else None
    many = world > 1
    header = (f"{'mode':<10}{'ms/step':>10}{'samples/s':>11}" + (f"{'all GPUs':>10}" if many else "")
              + f"{'host syncs':>12}{'ATen ops':>10}" + (f"{'c10d ops':>10}" if many else "")
              + f"{'peak GiB':>10}{'TFLOP/s':>9}{'MFU':>7}")
    sync_bn = "none" if not many else (
        ("global" if not cfg.sync_bn_group_size else f"groups of {cfg.sync_bn_group_size}")
        if cfg.sync_bn and device.type == "cuda" else "none (plain BN)")
    print(f"# {device_name}" + (f" x {world} ranks (SyncBN {sync_bn}; samples/s and TFLOP/s per GPU, ms/step of the "
                                "slowest rank)" if many else "")
          + f", {args.arch}, {args.batch} images" + (" per rank" if many else "")
          + f" x {args.counts} crops of {args.sizes}, K {args.prototypes}, queue {queue_rows}"
          + (f" ({queue_rows // world} rows per rank)" if many else "")
          + f", Sinkhorn {cfg.sinkhorn_impl} (official-style: reference); median of {args.steps} steps after "
          f"{args.warmup} warm-up; "
          + (f"{flops / 1e9:.1f} GFLOP per step (fwd+bwd)" if flops else "FLOPs not counted"))
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<10}FAILED: {r['error']}")
            continue
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        syncs, ops, coll = (("-" if r[k] is None else r[k])
                            for k in ("host_syncs_per_step", "aten_ops_per_step", "collectives_per_step"))
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['mode']:<10}{r['ms_per_step']:>10.2f}{r['samples_per_s']:>11.1f}"
              + (f"{r['samples_per_s_total']:>10.1f}" if many else "") + f"{syncs:>12}{ops:>10}"
              + (f"{coll:>10}" if many else "") + f"{mem:>10}"
              + (f"{r['tflops_per_s']:>9.2f}" if r["tflops_per_s"] is not None else f"{'-':>9}") + f"{mfu:>7}")
    if ok and args.arch == "resnet50" and args.sizes[0] == 224:  # the ImageNet recipes' model and crops
        best = max(ok, key=lambda r: r["samples_per_s_total"])
        minutes = IMAGENET_TRAIN_IMAGES / best["samples_per_s_total"] / 60
        print(f"# at the {best['mode']} rate, the step alone (no data loading) would take {minutes:.1f} min per "
              f"ImageNet-1k epoch ({IMAGENET_TRAIN_IMAGES:,} images) on {world} {'GPUs' if many else 'device'}, "
              f"{minutes * 200 / 60:.1f} h for 200 epochs")
    return flops, peak


def run(args: argparse.Namespace, cfg: Config, info: DistInfo) -> int:
    device, world = info.device, info.world_size
    say = (lambda msg: print(msg, file=sys.stderr)) if info.is_main else (lambda msg: None)  # noqa: E731
    queue_rows = trimmed_queue_length(cfg, world)
    # made once: each call makes new communicators
    bn_group = syncbn_group(info, cfg.sync_bn_group_size) if world > 1 and cfg.sync_bn and device.type == "cuda" \
        else None
    rows = []
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    def write_json(**content) -> None:  # rank 0's JSON, rewritten as the figures come in
        if args.json and info.is_main:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "world_size": world,
                                             **content}, indent=1))

    # Sinkhorn alone first: seconds, and its figure is one of the targets, which a slow compile mode later on must
    # not cost when a time limit cuts the run. Under torchrun a failure on any rank stops every rank.
    write_json(rows=rows, partial=True)  # the arguments, should even Sinkhorn alone not finish
    say("timing Sinkhorn alone ...")
    try:
        sk = time_sinkhorn(device, *args.sinkhorn_shape, cfg.epsilon, cfg.sinkhorn_iterations, max(args.steps, 10),
                           info.group)
    except Exception as e:  # noqa: BLE001  (only under torchrun: with one process failures are rows)
        stop_every_rank("Sinkhorn alone", info, e)
    sk = slowest_sinkhorn(gather_objects(sk, info))
    if info.is_main:
        print(f"# Sinkhorn alone, K {args.sinkhorn_shape[0]} x B {args.sinkhorn_shape[1]}"
              + (f" per rank over {world} ranks" if world > 1 else "") + f", {cfg.sinkhorn_iterations} iterations: "
              + ", ".join(f"{s['impl']} " + (f"{s['ms']:.3f} ms" if "ms" in s else f"FAILED ({s['error']})")
                          for s in sk), flush=True)
    write_json(rows=rows, sinkhorn=sk, partial=True)

    # a mode that fails is reported and the others still run (one GPU session, all figures); under torchrun a
    # failure on any rank stops every rank
    for mode in args.modes:
        say(f"profiling {mode} ...")
        try:
            rows.append(profile(mode, copy.deepcopy(cfg), info, args.batch, args.steps, args.warmup, bn_group))
        except Exception as e:  # noqa: BLE001
            if world > 1:
                stop_every_rank(mode, info, e)
            print(f"{mode} failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"mode": mode, "error": failure(e), "device": device_name})
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        write_json(rows=rows, sinkhorn=sk, partial=True)  # rank 0's rows so far, should a time limit cut a later mode
    per_rank = gather_objects(rows, info)
    rows = [slowest_rank([r[i] for r in per_rank], world) for i in range(len(rows))]
    ok = [r for r in rows if "error" not in r]
    status = 0 if all("ms" in x for x in sk) and all(math.isfinite(r["ms_per_step"]) for r in ok) \
        and len(ok) == len(rows) else 1
    if not info.is_main:
        return status
    flops, peak = print_table(args, cfg, info, rows, device_name, queue_rows, say)
    write_json(rows=rows, flops_per_step=flops, peak_flops=peak, sinkhorn=sk)
    return status


if __name__ == "__main__":
    run_main(main)
