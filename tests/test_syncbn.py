"""swav_fast.syncbn: SyncBatchNorm without a host sync.

On CPU, on 2 gloo ranks with CPU stand-ins for the CUDA-only batch-norm kernels (tests/syncbn_standins.py): the same
outputs, gradients and running statistics as torch's SyncBatchNorm Function, bit for bit, and as one BatchNorm over
both ranks' batches; no host sync (torch's: its boolean mask); torch.compile(fullgraph=True) traces it. On CUDA
(gpu_suite.sh): the real kernels on one NCCL rank against torch's Function and F.batch_norm.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction

from swav_fast.distributed import exit_now
from swav_fast.model import SwAVModel
from swav_fast.syncbn import SyncBatchNorm, _SyncBatchNormFunction, convert_sync_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from profile_step import OpCounter  # noqa: E402

TESTS = Path(__file__).resolve().parent
SCALE = torch.arange(1.0, 4.0).reshape(1, 3, 1, 1)  # makes the loss depend on each channel differently


def _inputs(rank: int) -> torch.Tensor:
    return torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(rank + 1)) * (rank + 1) + rank


def _layer() -> SyncBatchNorm:
    bn = convert_sync_batchnorm(nn.BatchNorm2d(3))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import syncbn_standins

    syncbn_standins.register()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for kind in ("ours", "torch"):
            bn, x = _layer(), _inputs(rank).requires_grad_()
            with OpCounter() as counter:
                if kind == "ours":
                    y = bn(x)
                else:  # torch's module refuses CPU tensors; its Function does not
                    y = TorchSyncBatchNormFunction.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                         bn.eps, bn.momentum, dist.group.WORLD, world)
                (y * y * SCALE).sum().backward()
            results[kind] = {"y": y.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
                             "running_mean": bn.running_mean, "running_var": bn.running_var,
                             "syncs": counter.syncs, "sync_ops": {k: v for k, v in counter.ops.items()
                                                                  if k in ("index (bool mask)", "nonzero")}}
        # swav_fast.distributed.syncbn_group (train.py, profile_step): groups of 1 rank, or all ranks (None)
        from swav_fast.distributed import DistInfo, syncbn_group

        info = DistInfo(rank, world, rank, torch.device("cpu"))
        grouped = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), syncbn_group(info, 1))[0]
        results["grouped"] = (type(grouped).__module__, dist.get_process_group_ranks(grouped.process_group))
        results["whole"] = syncbn_group(info, 0)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()  # rank 0 hosts the store: none may leave while another still uses it (exit_now is immediate)
    finally:
        dist.destroy_process_group()
    exit_now(0)  # a finished rank skips the interpreter's teardown (see exit_process)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = str(tmp_path_factory.mktemp("syncbn") / "res")
    mp.spawn(_rank, args=(2, free_port(), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}") for r in range(2)]


def test_equals_torchs_function_bit_for_bit(two_ranks):
    for res in two_ranks:
        for key in ("y", "x_grad", "w_grad", "b_grad", "running_mean", "running_var"):
            assert torch.equal(res["ours"][key], res["torch"][key]), key


def test_equals_one_batchnorm_over_both_ranks_batches(two_ranks):
    bn, x = _layer(), torch.cat([_inputs(0), _inputs(1)]).requires_grad_()
    y = bn(x)  # no process group: plain BatchNorm over the 8 samples
    (y * y * SCALE).sum().backward()
    for rank, res in enumerate(two_ranks):
        part = slice(4 * rank, 4 * rank + 4)
        torch.testing.assert_close(res["ours"]["y"], y.detach()[part], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["ours"]["x_grad"], x.grad[part], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res["ours"]["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["ours"]["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
    # each rank's weight and bias gradients are its share (DDP or the step's all-reduce adds them up)
    for key, ref in (("w_grad", bn.weight.grad), ("b_grad", bn.bias.grad)):
        torch.testing.assert_close(two_ranks[0]["ours"][key] + two_ranks[1]["ours"][key], ref, rtol=1e-4, atol=1e-4)


def test_syncbn_groups(two_ranks):
    for rank, res in enumerate(two_ranks):
        assert res["grouped"] == ("swav_fast.syncbn", [rank])  # swav_fast's layer, a group of its own rank
        assert res["whole"] is None  # group size 0: all ranks


def test_no_host_sync_where_torchs_function_has_its_mask(two_ranks):
    for res in two_ranks:
        assert res["ours"]["syncs"] == 0, res["ours"]["sync_ops"]
        assert res["torch"]["sync_ops"].get("index (bool mask)", 0) >= 1, res["torch"]["sync_ops"]


def test_convert_makes_every_batchnorm_ours_and_keeps_the_state():
    model = SwAVModel("resnet18", 64, 16, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    converted = convert_sync_batchnorm(model)
    assert sum(type(m) is SyncBatchNorm for m in converted.modules()) == n_bn == 21  # 20 in the trunk, 1 in the head
    after = converted.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    # no process group: torch's forward, i.e. plain batch norm
    bn = _layer()
    x = _inputs(0)
    torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.1, bn.eps))


_COMPILE_PROBE = r'''
import sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
import syncbn_standins
from swav_fast.distributed import exit_now
from swav_fast.syncbn import convert_sync_batchnorm

syncbn_standins.register()
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=int(sys.argv[3]), world_size=2)
torch.manual_seed(0)
bn = convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
scale = torch.arange(1.0, 4.0).reshape(1, 3, 1, 1)

def step(x):
    loss = (bn(x) ** 2 * scale).sum()
    loss.backward()
    return loss.detach()

x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(int(sys.argv[3])))
expected, grads = step(x), [p.grad.clone() for p in bn.parameters()]
for p in bn.parameters():
    p.grad = None
torch._dynamo.config.trace_autograd_ops = True
got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
same = torch.allclose(got, expected) and all(torch.allclose(p.grad, g) for p, g in zip(bn.parameters(), grads))
print("TRACED", same)
dist.barrier()
# no interpreter teardown: with torch 2.11 it sometimes aborts there ("terminate called without an active exception",
# seen once in the full suite), which is not what this probe checks
exit_now(0)
'''


def test_a_full_graph_traces_it_on_two_ranks(tmp_path):
    """torch's SyncBatchNorm cannot be traced (tests/test_step_compile.py); this one can: compiled with
    fullgraph=True on 2 gloo ranks, loss and gradients equal to eager."""
    script = tmp_path / "probe.py"
    script.write_text(_COMPILE_PROBE)
    port = str(free_port())
    env = {**__import__("os").environ, "PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(TESTS), port, str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        assert "TRACED True" in stdout.splitlines(), stdout + stderr[-3000:]


_FAKE_BACKEND_PROBE = r"""
import os
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

sys.path.insert(0, sys.argv[1])
import syncbn_standins
from swav_fast.syncbn import convert_sync_batchnorm

syncbn_standins.register()
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
torch._dynamo.config.trace_autograd_ops = True
bn = convert_sync_batchnorm(torch.nn.BatchNorm2d(3))


def step(x):
    loss = (bn(x) ** 2).sum()
    loss.backward()
    return loss.detach()


step(torch.randn(4, 3, 5, 5))
torch.compile(step, fullgraph=True, backend="aot_eager")(torch.randn(4, 3, 5, 5))
print("COMPILED", dist.get_backend(), flush=True)
os._exit(0)
"""


def test_a_full_graph_traces_it_with_a_backend_other_than_gloo(tmp_path):
    """What NCCL runs, without GPUs: torch's fake process group (a backend that is not gloo, 2 ranks in one
    process). The all-gather must give torch.compile's functional collective a flat output: a [W, 2C + 1] one fails
    in fullgraph tracing (it did, at the first step of --step_mode compile with SyncBN on several GPUs)."""
    script = tmp_path / "probe.py"
    script.write_text(_FAKE_BACKEND_PROBE)
    env = {**__import__("os").environ, "PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(TESTS)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "COMPILED fake" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_on_one_nccl_rank_match_torch_and_batch_norm(dtype):
    """The real CUDA kernels (one rank: the Function directly, as the module then uses plain batch norm), in the
    layout and precision of training: channels_last, fp32 and bf16 activations."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        x0 = (torch.randn(8, 16, 12, 12, device="cuda") * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
        w, b = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
        results = []
        for fn in (_SyncBatchNormFunction, TorchSyncBatchNormFunction, None):
            x = x0.clone().requires_grad_()
            weight, bias = w.clone().requires_grad_(), b.clone().requires_grad_()
            rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
            y = (fn.apply(x, weight, bias, rm, rv, 1e-5, 0.1, dist.group.WORLD, 1) if fn is not None
                 else F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5))
            (y.float() ** 2).sum().backward()
            results.append([t.float() for t in (y, x.grad, weight.grad, bias.grad, rm, rv)])
        # the same kernels as torch's Function (a reduction's order may still differ between two runs: not bit for
        # bit), and what plain batch norm computes
        same = 1e-5 if dtype == torch.float32 else 8e-3
        for a, b_ in zip(results[0], results[1], strict=True):
            torch.testing.assert_close(a, b_, rtol=same, atol=same)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for a, b_ in zip(results[0], results[2], strict=True):
            torch.testing.assert_close(a, b_, rtol=tol, atol=tol)
    finally:
        dist.destroy_process_group()
