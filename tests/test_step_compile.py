"""The step is one graph with no host sync: torch.compile(fullgraph=True) traces it, backward and all, and gives
the eager numbers; a dispatch-mode count finds no op that hands a value to Python."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port, needs_triton_interpreter

from swav_fast.config import Config
from swav_fast.model import SwAVModel
from swav_fast.optim import LARS
from swav_fast.queue import EmbeddingQueue
from swav_fast.step import compiled_step_core, train_step
from tools.profile_step import OfficialStep, OpCounter

CFG = Config(arch="resnet18", hidden_mlp=16, feat_dim=8, nmb_prototypes=6, nmb_crops=[2, 1], size_crops=[32, 16],
             min_scale_crops=[0.5, 0.2], max_scale_crops=[1.0, 0.5], freeze_prototypes_niters=2, queue_length=8,
             batch_size=4, epsilon=0.05)


def crops_for(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g),
            torch.randn(4, 3, 16, 16, generator=g)]


def setup():
    torch.manual_seed(0)
    model = SwAVModel(CFG.arch, CFG.hidden_mlp, CFG.feat_dim, CFG.nmb_prototypes)
    opt = LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001)
    queue = EmbeddingQueue(2, 8, CFG.feat_dim, 4, "cpu")
    return model, opt, queue


def test_compiled_full_graph_step_equals_eager():
    # aot_eager: dynamo + AOT autograd trace the whole step into one graph (fullgraph=True turns any graph break
    # into an error) without inductor's code generation, which would take minutes on 2 CPU cores.
    torch._dynamo.reset()
    compiled = compiled_step_core(backend="aot_eager")
    eager_m, eager_opt, eager_q = setup()
    comp_m, comp_opt, comp_q = setup()
    phases = []
    for it in range(5):  # frozen for 0, 1; queue in use from step 2 (2 pushes of 4 fill 8 rows)
        phases.append((it < CFG.freeze_prototypes_niters, eager_q.in_use))
        lr = 0.5 * (1 - it / 10)
        a = train_step(eager_m, eager_opt, crops_for(it), lr, it, CFG, eager_q)
        b = train_step(comp_m, comp_opt, crops_for(it), lr, it, CFG, comp_q, core=compiled)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert phases == [(True, False), (True, False), (False, True), (False, True), (False, True)]
    for (name, p), q in zip(eager_m.named_parameters(), comp_m.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(comp_q.buffer, eager_q.buffer, rtol=1e-5, atol=1e-6)
    assert comp_q.n_pushed == eager_q.n_pushed == 5


def _fused_sinkhorn_child() -> None:
    """In a child with TRITON_INTERPRET=1: the step with --sinkhorn_impl triton, eager and compiled."""
    import dataclasses

    cfg = dataclasses.replace(CFG, sinkhorn_impl="triton")
    torch._dynamo.reset()
    compiled = compiled_step_core(backend="aot_eager")
    (eager_m, eager_opt, eager_q), (comp_m, comp_opt, comp_q) = setup(), setup()
    for it in range(4):  # frozen for 0, 1; queue in use from step 2
        a = train_step(eager_m, eager_opt, crops_for(it), 0.5, it, cfg, eager_q)
        b = train_step(comp_m, comp_opt, crops_for(it), 0.5, it, cfg, comp_q, core=compiled)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager_m.named_parameters(), comp_m.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    print("fused sinkhorn step: compiled == eager")


@needs_triton_interpreter
def test_compiled_step_with_the_fused_sinkhorn_is_one_graph():
    """The fused Sinkhorn is a custom op (torch.ops.swav_fast.sinkhorn_fused): torch.compile(fullgraph=True)
    takes it as one opaque call instead of tracing its launch code. Its kernels run in Triton's interpreter
    here, so TRITON_INTERPRET=1 must be set before triton defines them: a child process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", "import test_step_compile as t; t._fused_sinkhorn_child()"],
                          env=env, cwd=tests.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiled == eager" in proc.stdout


def test_our_step_has_no_host_sync_and_the_official_one_has_many():
    model, opt, queue = setup()
    for it in range(3):  # fill the queue and leave the freeze window
        train_step(model, opt, crops_for(it), 0.1, it, CFG, queue)
    ours = OpCounter()
    with ours:
        train_step(model, opt, crops_for(3), 0.1, 3, CFG, queue)
    assert ours.syncs == 0, ours.ops

    official_model = copy.deepcopy(model)
    buf = F.normalize(torch.randn(2, 8, CFG.feat_dim), dim=-1)
    official = OfficialStep(official_model, CFG, buf)
    theirs = OpCounter()
    with theirs:
        official(crops_for(3), 0.1, 3, torch.autocast("cpu", enabled=False))
    n_params = len(list(official_model.parameters()))
    # LARC's `if` reads two norms per parameter; the queue test and loss.item() read one value each
    assert theirs.syncs >= 2 * n_params + 2
    assert theirs.total > ours.total  # and it dispatches more ops (per-parameter LARC instead of foreach)


def test_train_py_compile_mode_gives_the_eager_losses(digits_dir, tmp_path, monkeypatch, capsys):
    import json

    import train
    from tests.test_train import run

    # the same wiring as --step_mode compile, with the quick backend (inductor's codegen takes minutes here)
    monkeypatch.setattr(train, "compiled_step_core", lambda: compiled_step_core(backend="aot_eager"))
    losses, rates, said = {}, {}, {}
    for mode in ("eager", "compile"):
        assert run(digits_dir, tmp_path / mode, "--epochs", "1", "--warmup_epochs", "0", "--step_mode", mode) == 0
        said[mode] = capsys.readouterr().err
        rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in rows if "event" not in r]
        rates[mode] = ["samples_per_s" in r for r in rows if "event" not in r]
    assert len(losses["eager"]) == 4
    torch.testing.assert_close(torch.tensor(losses["compile"]), torch.tensor(losses["eager"]), rtol=1e-5, atol=1e-6)
    # One step per loss window. The queue (16 rows, 8 per step) comes into use at step 3 and the freeze window
    # (3 iterations) ends at step 4: the compiled step compiles again at both, and those windows have no rate,
    # as the first step's has none; eager mode times every step after the first.
    assert rates == {"eager": [False, True, True, True], "compile": [False, True, False, False]}
    assert "leaving out 2 step(s) that compiled the step again for a new phase" in said["compile"], said["compile"]
    assert "compiled the step again" not in said["eager"]


def test_profile_step_cli_prints_the_table(capsys, tmp_path):
    import json

    from tools.profile_step import main

    out = tmp_path / "p.json"
    assert main(["--device", "cpu", "--arch", "resnet18", "--batch", "4", "--sizes", "32", "16", "--counts", "2", "1",
                 "--prototypes", "10", "--queue", "8", "--steps", "1", "--warmup", "1", "--modes", "official",
                 "eager", "--sinkhorn-shape", "30", "40", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "host syncs" in text and "official" in text and "eager" in text and "Sinkhorn alone" in text
    rep = json.loads(out.read_text())
    rows = {r["mode"]: r for r in rep["rows"]}
    assert rows["eager"]["host_syncs_per_step"] == 0 < rows["official"]["host_syncs_per_step"]
    for r in rows.values():  # achieved TFLOP/s is the counted FLOPs over the measured time; no MFU without a GPU
        assert r["tflops_per_s"] == pytest.approx(rep["flops_per_step"] / (r["ms_per_step"] / 1e3) / 1e12)
        assert r["mfu"] is None
    assert [(s["impl"], s["k"], s["b"]) for s in rep["sinkhorn"]] == [("reference", 30, 40)]
    assert rep["sinkhorn"][0]["ms"] > 0


def test_profile_step_reports_a_failing_mode_and_runs_the_others(capsys, tmp_path, monkeypatch):
    import json

    import tools.profile_step as ps

    real = ps.profile

    def flaky(mode, *a, **k):
        if mode == "eager":
            raise RuntimeError("capture went wrong")
        return real(mode, *a, **k)

    monkeypatch.setattr(ps, "profile", flaky)
    out = tmp_path / "p.json"
    assert ps.main(["--device", "cpu", "--arch", "resnet18", "--batch", "4", "--sizes", "32", "16", "--counts", "2",
                    "1", "--prototypes", "10", "--queue", "0", "--steps", "1", "--warmup", "1", "--modes", "eager",
                    "official", "--sinkhorn-shape", "30", "40", "--json", str(out)]) == 1
    assert "eager     FAILED: RuntimeError: capture went wrong" in capsys.readouterr().out
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["eager"]["error"] == "RuntimeError: capture went wrong" and "ms_per_step" not in rows["eager"]
    assert rows["official"]["ms_per_step"] > 0 and rows["official"]["tflops_per_s"] > 0


def _profile_step_two_ranks(script: str, out: Path, timeout: int, env: dict | None = None):
    """`script` (tools/profile_step.py or a wrapper of it) on 2 gloo ranks under torchrun, small shapes, official
    and eager modes, the JSON written to `out`: the finished process."""
    from conftest import run_torchrun

    return run_torchrun([script, "--device", "cpu", "--arch", "resnet18", "--batch", "2", "--sizes", "32", "16",
                         "--counts", "2", "2", "--prototypes", "30", "--queue", "8", "--steps", "2", "--warmup", "1",
                         "--modes", "official", "eager", "--sinkhorn-shape", "30", "40", "--json", str(out)],
                        timeout, env)


def test_profile_step_under_torchrun_two_ranks(tmp_path):
    """Two gloo ranks: the steps run as in train.py (DDP, the Sinkhorns over the group), rank 0 alone prints one
    table with the slowest rank's time and the samples/s of both; each rank holds half the queue."""
    import json

    out = tmp_path / "p.json"
    proc = _profile_step_two_ranks("tools/profile_step.py", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("host syncs") == 1, proc.stdout  # one table, from rank 0
    assert "x 2 ranks" in proc.stdout and "queue 8 (4 rows per rank)" in proc.stdout
    assert "K 30 x B 40 per rank over 2 ranks" in proc.stdout
    rep = json.loads(out.read_text())
    assert rep["world_size"] == 2 and "partial" not in rep
    rows = {r["mode"]: r for r in rep["rows"]}
    assert set(rows) == {"official", "eager"}
    assert rows["eager"]["host_syncs_per_step"] == 0 < rows["official"]["host_syncs_per_step"]
    n_assign, n_iters = 2, 3  # crops_for_assign [0, 1]; 3 Sinkhorn iterations
    for r in rows.values():
        assert r["world_size"] == 2
        assert r["samples_per_s_total"] == pytest.approx(2 * r["samples_per_s"])
        assert r["samples_per_s"] == pytest.approx(2 / r["ms_per_step"] * 1e3)
        # each assignment crop's Sinkhorn all-reduces its total and each iteration's row sums; DDP adds its own
        assert r["collectives_per_step"] > n_assign * (1 + n_iters), r
    assert rep["sinkhorn"][0]["ms"] > 0


_FAIL_ON_RANK_1 = r'''
import os, sys
sys.path.insert(0, "tools")
import profile_step
import swav_fast.step
calls = []
real_step, real_choice = profile_step.train_step, swav_fast.step.sinkhorn_function


def train_step(*args, **kwargs):  # the eager mode's third step raises on rank 1 only, after the others' first ones
    calls.append(1)
    if os.environ["FAIL"] == "eager" and os.environ["RANK"] == "1" and len(calls) == 3:
        raise RuntimeError("out of memory, say")
    return real_step(*args, **kwargs)


def sinkhorn_function(impl):  # Sinkhorn alone (its 40 rows; the steps' have fewer) raises on rank 1 only
    fn = real_choice(impl)

    def sinkhorn(scores, *args):
        if os.environ["FAIL"] == "sinkhorn" and os.environ["RANK"] == "1" and scores.shape[0] == 40:
            raise RuntimeError("capture failed, say")
        return fn(scores, *args)

    return sinkhorn


profile_step.train_step, swav_fast.step.sinkhorn_function = train_step, sinkhorn_function
profile_step.run_main(lambda: profile_step.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("fail, message, measured", [
    ("eager", "eager failed on rank 1: RuntimeError: out of memory, say", ["official"]),
    ("sinkhorn", "Sinkhorn alone failed on rank 1: RuntimeError: capture failed, say", [])])
def test_profile_step_under_torchrun_stops_every_rank_when_one_fails(tmp_path, fail, message, measured):
    """A mode, or Sinkhorn alone, failing on one rank only (rank 0 waits in its collectives): every rank stops,
    rank 0's JSON keeps what was measured before, instead of the ranks waiting for each other until NCCL's
    timeout."""
    import json

    script, out = tmp_path / "fail_on_rank_1.py", tmp_path / "p.json"
    script.write_text(_FAIL_ON_RANK_1)
    proc = _profile_step_two_ranks(str(script), out, timeout=240, env={"FAIL": fail})
    assert proc.returncode != 0
    assert f"{message}; stopping every rank" in proc.stderr, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["partial"] and [r["mode"] for r in rep["rows"]] == measured
    # Sinkhorn alone runs first: its figure is in the JSON unless it is what failed
    assert ("sinkhorn" in rep) == (fail != "sinkhorn") and "host syncs" not in proc.stdout


def test_count_cuda_syncs_counts_the_debug_modes_warnings_and_restores_it(monkeypatch):
    """The CUDA sync count with a stand-in for torch.cuda.set_sync_debug_mode (no GPU here): the step runs in
    "warn" mode, each synchronizing call's warning is counted (other warnings are not, repeats are), and the mode
    is back to "default" afterwards, also when the step raises."""
    from tools.profile_step import count_cuda_syncs

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        assert modes[-1] == "warn"
        for _ in range(3):  # the same line three times: "always", not once per location
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)

    assert count_cuda_syncs(step) == 3 and modes == ["warn", "default"]
    with pytest.raises(ZeroDivisionError):
        count_cuda_syncs(lambda: 1 / 0)
    assert modes[-1] == "default"


def test_profile_step_takes_the_slowest_rank():
    from tools.profile_step import slowest_rank, slowest_sinkhorn

    def row(ms, mem=None, syncs=0):
        return {"mode": "eager", "ms_per_step": ms, "ms_min": ms - 1, "samples_per_s": 64 / ms * 1e3,
                "host_syncs_per_step": syncs, "aten_ops_per_step": 10, "collectives_per_step": 3,
                "peak_mem_gib": mem, "trials": 5, "device": "cpu"}

    merged = slowest_rank([row(10.0, 2.0, syncs=0), row(12.0, 1.5, syncs=7)], 2)
    assert merged["ms_per_step"] == 12.0 and merged["ms_min"] == 11.0 and merged["peak_mem_gib"] == 2.0
    assert merged["host_syncs_per_step"] == 0  # rank 0's counts
    assert merged["samples_per_s_total"] == pytest.approx(2 * 64 / 12.0 * 1e3)
    failed = {"mode": "eager", "error": "RuntimeError: boom", "device": "cpu"}
    assert slowest_rank([failed], 1) == failed
    sk = slowest_sinkhorn([[{"impl": "reference", "ms": 1.0}, {"impl": "triton", "ms": 0.2}],
                           [{"impl": "reference", "ms": 1.5}, {"impl": "triton", "error": "X: y"}]])
    assert sk == [{"impl": "reference", "ms": 1.5}, {"impl": "triton", "error": "X: y"}]


def test_step_flops_match_torchvision_resnet18_count():
    """224-px images through resnet18: forward + backward = 3 x forward (grads of inputs and of weights),
    torchvision's published forward count is 1.814 G multiply-adds = 3.63 GFLOP (the head adds < 1 %)."""
    from swav_fast.config import Config
    from tools.profile_step import step_flops

    cfg = Config(arch="resnet18", nmb_crops=[1], size_crops=[224], min_scale_crops=[0.14], max_scale_crops=[1.0],
                 hidden_mlp=32, feat_dim=16, nmb_prototypes=10, crops_for_assign=[0])
    flops = step_flops(cfg, torch.device("cpu"), 2) / 2  # 2 images: the head's BatchNorm needs more than one
    # the first convolution needs no input gradient: a little under 3x
    assert 0.93 * 3 * 3.628e9 < flops < 1.01 * 3 * 3.628e9, flops


# ----------------------------------------------------------------------------- SyncBatchNorm under torch.compile

# torch's SyncBatchNorm Function with CPU stand-ins for its CUDA-only batch_norm_* kernels (tests/syncbn_standins.py),
# run by one gloo rank. "torch": the Function as it is (it drops empty ranks' statistics with a boolean mask unless a
# CUDA graph is being captured, which tracing is not); "static": the same kernels called with fixed shapes, no mask.
_SYNC_BN_PROBE = r'''
import sys, torch, torch.distributed as dist
from torch.nn.modules._functions import SyncBatchNorm

sys.path.insert(0, sys.argv[3])
import syncbn_standins

syncbn_standins.register()
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
running_mean, running_var = torch.zeros(3), torch.ones(3)

def with_function(x):
    y = SyncBatchNorm.apply(x, w, b, running_mean, running_var, 1e-5, 0.1, dist.group.WORLD, 1)
    loss = (y * y * torch.arange(3.0).reshape(1, 3, 1, 1)).sum()
    loss.backward()
    return loss.detach()

def static(x):
    mean, invstd = torch.batch_norm_stats(x, 1e-5)
    count = torch.full((1,), x.numel() // x.size(1), dtype=x.dtype)
    mean, invstd = torch.batch_norm_gather_stats_with_counts(x, mean[None], invstd[None], running_mean,
                                                             running_var, 0.1, 1e-5, count)
    y = torch.batch_norm_elemt(x, w, b, mean, invstd, 1e-5)
    return (y * y * torch.arange(3.0).reshape(1, 3, 1, 1)).sum()

fn = with_function if sys.argv[1] == "torch" else static
x = torch.randn(4, 3, 5, 5)
expected = fn(x)
torch._dynamo.config.trace_autograd_ops = True
try:
    got = torch.compile(fn, fullgraph=True, backend="eager")(x)
except Exception as exc:
    print("TRACE FAILED", type(exc).__name__, str(exc).splitlines()[0])
else:
    print("TRACED", bool(torch.allclose(got, expected)))
dist.destroy_process_group()
'''


@pytest.mark.parametrize("variant", ["torch", "static"])
def test_torch_sync_batchnorm_cannot_be_traced_by_a_full_graph(variant, tmp_path):
    # Why swav_fast has its own SyncBatchNorm (swav_fast/syncbn.py, which traces: tests/test_syncbn.py): the mask
    # of torch's Function is a data-dependent shape that fullgraph cannot trace (and a host sync per layer on
    # CUDA), while its kernels alone trace. If a torch release drops the mask, swav_fast.syncbn can go.
    import subprocess
    import sys

    port = free_port()
    script = tmp_path / "probe.py"
    script.write_text(_SYNC_BN_PROBE)
    out = subprocess.run([sys.executable, str(script), variant, str(port), str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("TRACE", "TRACED"))]
    if variant == "torch":
        assert lines and lines[0].startswith("TRACE FAILED"), out.stdout
    else:
        assert lines == ["TRACED True"], out.stdout + out.stderr[-3000:]


def test_device_config_problems():
    from train import device_config_problem

    # compile on CUDA, SyncBatchNorm with several ranks included: accepted (swav_fast.syncbn traces; test_syncbn.py)
    assert device_config_problem(Config(step_mode="compile"), on_cuda=True) is None
    assert device_config_problem(Config(step_mode="graph"), on_cuda=True) is None
    assert "CUDA" in device_config_problem(Config(step_mode="graph"), on_cuda=False)
    assert "CUDA" in device_config_problem(Config(sinkhorn_impl="triton"), on_cuda=False)
