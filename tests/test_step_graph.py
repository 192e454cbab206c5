"""The step's own gradient all-reduce (instead of DDP) and --step_mode graph (GraphStep), against the eager step.

On CPU: GraphStep's host logic (static buffers, copy-in, device flags, warm-up/capture/replay order, recapture
when the queue appears) with capture=False, which records the captured step's ops and replays them with every
host value frozen as at capture (RecordedGraph: a CUDA graph's semantics), and 2 gloo ranks where DDP and the
step's own all-reduce (eager, GraphStep, and torch.compile(fullgraph=True) with aot_eager on rank 0) give the same
parameters. On CUDA (skipped without one, run by tools/gpu_suite.sh): real capture and replay against eager.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from swav_fast.config import Config
from swav_fast.distributed import DistInfo, broadcast_module_, exit_now, wrap_for_step_mode
from swav_fast.model import SwAVModel
from swav_fast.optim import LARS
from swav_fast.queue import EmbeddingQueue
from swav_fast.step import GraphStep, compiled_step_core, step_autocast, train_step

CFG = Config(arch="resnet18", hidden_mlp=16, feat_dim=8, nmb_prototypes=6, nmb_crops=[2, 1], size_crops=[32, 16],
             min_scale_crops=[0.5, 0.2], max_scale_crops=[1.0, 0.5], freeze_prototypes_niters=2, queue_length=8,
             batch_size=4, epsilon=0.05)
BS = 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")


def crops_for(step: int, device="cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(BS, 3, s, s, generator=g).to(device) for s in (32, 32, 16)]


def setup(device="cpu"):
    torch.manual_seed(0)
    model = SwAVModel(CFG.arch, CFG.hidden_mlp, CFG.feat_dim, CFG.nmb_prototypes).to(device)
    opt = LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001)
    return model, opt, EmbeddingQueue(2, 8, CFG.feat_dim, BS, device)


def lr_at(it: int) -> float:
    return 0.5 * (1 - it / 10)


def assert_same_state(model_a, opt_a, model_b, opt_b, rtol, atol):
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=name)
        torch.testing.assert_close(opt_b.state[q]["momentum_buffer"], opt_a.state[p]["momentum_buffer"], rtol=rtol,
                                   atol=atol, msg=f"momentum of {name}")
    for (name, b), c in zip(model_a.named_buffers(), model_b.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=rtol, atol=atol, msg=name)


# ----------------------------------------------------------------------------- GraphStep's host logic on CPU


@pytest.mark.parametrize("queue_from", [0, 2])
def test_graph_runner_equals_eager_across_freeze_end_and_queue_start(queue_from):
    """Steps 0, 1 frozen; the queue (8 rows, 4 per push) exists from step queue_from and is in use 2 pushes
    later. queue_from=2 is train.py at epoch_queue_starts: a new queue object, so the runner starts over. The
    replays run the ops recorded at capture, so the lr (new every step) and the two flags must come from the
    device tensors: a host value would stay as it was at capture (passing float(lr) or bool(frozen) fails here)."""
    eager_m, eager_opt, _ = setup()
    graph_m, graph_opt, _ = setup()
    runner = GraphStep(capture=False, warmup=1)
    eager_q = graph_q = None
    phases, n_steps = [], queue_from + 5
    for it in range(n_steps):
        if it == queue_from:
            eager_q, graph_q = (EmbeddingQueue(2, 8, CFG.feat_dim, BS, "cpu") for _ in range(2))
        phases.append((it < CFG.freeze_prototypes_niters, eager_q is not None and eager_q.in_use))
        a = train_step(eager_m, eager_opt, crops_for(it), lr_at(it), it, CFG, eager_q)
        b = train_step(graph_m, graph_opt, crops_for(it), lr_at(it), it, CFG, graph_q, core=runner)
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"loss at step {it}")
    # frozen, then not; queue absent or filling, then in use: both transitions are crossed
    assert phases == [(True, False)] * 2 + [(False, False)] * queue_from + [(False, True)] * 3
    assert_same_state(eager_m, eager_opt, graph_m, graph_opt, rtol=0, atol=0)
    torch.testing.assert_close(graph_q.buffer, eager_q.buffer, rtol=0, atol=0)
    assert graph_q.n_pushed == eager_q.n_pushed == 5
    # warm-up, capture, replays; a second capture when the queue appeared mid-run
    assert runner.n_captures == (1 if queue_from == 0 else 2)
    assert runner._replay is not None and runner._n_warm == 1


def test_graph_runner_flags_are_read_every_step():
    """The flags come from the host state of each call (iteration vs the freeze window, the queue's fill count):
    a runner fed a stuck state (always step 0, queue never full) ends elsewhere."""
    good_m, good_opt, good_q = setup()
    stuck_m, stuck_opt, stuck_q = setup()
    good, stuck = GraphStep(capture=False, warmup=0), GraphStep(capture=False, warmup=0)
    for it in range(4):
        train_step(good_m, good_opt, crops_for(it), lr_at(it), it, CFG, good_q, core=good)
        stuck_q.n_pushed = 0  # never in use
        train_step(stuck_m, stuck_opt, crops_for(it), lr_at(0), 0, CFG, stuck_q, core=stuck)  # always frozen
    assert good.n_captures == stuck.n_captures == 1
    assert not torch.allclose(good_m.prototypes.weight, stuck_m.prototypes.weight, atol=1e-4)
    assert not torch.allclose(good_m.conv1.weight, stuck_m.conv1.weight, atol=1e-6)


def test_recorded_graph_has_a_cuda_graphs_semantics():
    from swav_fast.step import RecordedGraph

    state, scale, made = torch.zeros(3), torch.full((), 2.0), []
    host_factor = 10.0
    graph = RecordedGraph()
    with graph:
        state.add_(1.0)  # an older tensor changed by the step
        made.append(state * scale * host_factor)  # a new tensor; a device value and a host value
    assert torch.equal(made[0], torch.full((3,), 20.0))  # ran once while recording ...
    graph.undo()
    assert torch.equal(state, torch.zeros(3))  # ... and left no trace, as a capture runs no kernel
    graph.replay()
    assert torch.equal(state, torch.ones(3)) and torch.equal(made[0], torch.full((3,), 20.0))
    scale.fill_(3.0)  # read at every replay
    host_factor = 100.0  # noqa: F841 - frozen at capture: the replay never sees it
    graph.replay()
    assert torch.equal(state, torch.full((3,), 2.0)) and torch.equal(made[0], torch.full((3,), 60.0))


def test_graph_runner_refuses_to_capture_on_cpu():
    model, opt, queue = setup()
    with pytest.raises(ValueError, match="CUDA"):
        train_step(model, opt, crops_for(0), 0.1, 0, CFG, queue, core=GraphStep(capture=True))


def test_train_py_graph_mode_gives_the_eager_losses_and_resumes(digits_dir, tmp_path, monkeypatch):
    """train.py's graph-mode wiring on CPU, with the emulated capture: LossLog, the queue created at epoch 1 (a
    second capture), the freeze window ending at step 3, a stop after epoch 1 and a resume (a new runner: warm-up
    and capture again) give the eager run's losses bit for bit."""
    import train
    from tests.test_long_runs import losses_by_iteration
    from tests.test_train import run

    made = []
    monkeypatch.setattr(train, "GraphStep", lambda: made.append(GraphStep(capture=False)) or made[-1])
    monkeypatch.setattr(train, "device_config_problem", lambda cfg, on_cuda: None)  # graph on CPU
    args = ("--epoch_queue_starts", "1", "--max_steps_per_epoch", "6")
    assert run(digits_dir, tmp_path / "eager", *args) == 0
    assert run(digits_dir, tmp_path / "graph", *args, "--step_mode", "graph") == 0
    assert [g.n_captures for g in made] == [2]  # before and after the queue appeared
    assert run(digits_dir, tmp_path / "split", *args, "--step_mode", "graph", "--stop_after_epoch", "1") == 0
    assert train.main(["--run_dir", str(tmp_path / "split"), "--resume", "auto"]) == 0
    assert [g.n_captures for g in made[1:]] == [1, 1]
    # every runner's graph was freed when train.py left (before destroy_process_group, which NCCL makes wait for
    # live graphs holding its collectives)
    assert [g._replay for g in made] == [None] * 3
    eager = losses_by_iteration(tmp_path / "eager")
    assert sorted(eager) == list(range(1, 13))
    assert losses_by_iteration(tmp_path / "graph") == eager
    assert losses_by_iteration(tmp_path / "split") == eager


def test_train_py_graph_mode_on_cpu_is_one_config_error(digits_dir, tmp_path, capsys):
    from tests.test_train import run

    assert run(digits_dir, tmp_path / "r", "--epochs", "1", "--step_mode", "graph") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "config error" in line]
    assert len(lines) == 1 and "--step_mode graph" in lines[0] and "CUDA" in lines[0], err


# ----------------------------------------------------------------------------- 2 ranks: DDP vs the step's all-reduce



def _rank_worker(rank: int, world: int, port: int, backend: str, variants: list[str], out: str) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    try:
        torch.manual_seed(rank)  # different weights on each rank; broadcast_module_ makes them rank 0's
        probe = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).to(device)
        probe[1].running_mean.normal_()
        before = {k: v.detach().cpu().clone() for k, v in probe.state_dict().items()}
        broadcast_module_(probe, group)
        results = {"broadcast": (before, {k: v.detach().cpu() for k, v in probe.state_dict().items()})}
        for variant in variants:
            t0 = time.perf_counter()
            model, opt, queue = setup(device)
            core, grad_group, step_model = None, group, model
            if variant == "ddp":  # as train.py's eager mode: DDP with the gradients as views into its buckets
                step_model, grad_group = wrap_for_step_mode(model, "eager", DistInfo(rank, world, rank, device))
            elif variant == "ddp_copies":  # DDP's defaults: each gradient copied into its bucket and back
                grad_group = None
                step_model = torch.nn.parallel.DistributedDataParallel(model,
                                                                       device_ids=[rank] if backend == "nccl" else None)
            elif variant == "alone":  # no gradient averaging at all: the ranks drift apart
                grad_group = None
            elif variant == "compile" and rank == 0:
                # Only rank 0 compiles (rank 1 runs the same step eagerly and meets it in every collective):
                # two ranks compiling at once on this 2-core machine took 90 s, one takes half of that.
                torch._dynamo.reset()
                core = compiled_step_core(backend="aot_eager")
            elif variant.startswith("graph"):
                core = GraphStep(capture=variant == "graph_capture", warmup=1)
            losses = []
            for it in range(3):  # frozen at 0, 1; queue in use at 2
                crops = crops_for(100 * rank + it, device)  # each rank its own data
                losses.append(train_step(step_model, opt, crops, lr_at(it), it, CFG, queue, group, core=core,
                                         grad_group=grad_group).cpu())
            results[variant] = {"losses": losses, "queue": queue.buffer.cpu(),
                                "params": {n: p.detach().cpu() for n, p in model.named_parameters()},
                                "buffers": {n: b.cpu() for n, b in model.named_buffers() if b.is_floating_point()},
                                "seconds": time.perf_counter() - t0}
            if isinstance(core, GraphStep):
                core.close()  # before destroy_process_group, which waits for graphs holding NCCL collectives
        torch.save(results, f"{out}.{rank}")
        dist.barrier()  # rank 0 hosts the store: none may leave while another still uses it (exit_now is immediate)
    finally:
        dist.destroy_process_group()
    exit_now(0)  # a finished rank skips the interpreter's teardown (see exit_process)


def _ranks(tmp_path, backend: str, variants: list[str], world: int = 2) -> list[dict]:
    out = str(tmp_path / "res")
    mp.spawn(_rank_worker, args=(world, free_port(), backend, variants, out), nprocs=world, join=True)
    return [torch.load(f"{out}.{r}") for r in range(world)]


def _max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


def _check_against_ddp(results: list[dict], variants: list[str], tol: float) -> None:
    for rank, res in enumerate(results):
        ddp = res["ddp"]
        for v in variants:
            err = _max_rel(res[v]["params"], ddp["params"])
            assert err <= tol, f"rank {rank}, {v}: largest relative parameter difference {err:.3g} vs DDP"
            torch.testing.assert_close(torch.stack(res[v]["losses"]), torch.stack(ddp["losses"]), rtol=tol, atol=tol)
            torch.testing.assert_close(res[v]["queue"], ddp["queue"], rtol=tol, atol=tol)
        # BN running statistics: DDP broadcasts rank 0's before each forward, so only rank 0's are comparable
        if rank == 0:
            assert _max_rel(res[v]["buffers"], ddp["buffers"]) <= tol, v
    # the ranks agree with each other (same averaged gradients)
    for v in ["ddp", *variants]:
        assert _max_rel(results[1][v]["params"], results[0][v]["params"]) <= tol, v


def test_two_gloo_ranks_step_all_reduce_equals_ddp(tmp_path):
    variants = ["explicit", "graph", "compile"]
    results = _ranks(tmp_path, "gloo", ["ddp", "ddp_copies", "alone", *variants])
    print("seconds on rank 0:", {v: round(results[0][v]["seconds"], 1) for v in ["ddp", "alone", *variants]})
    print("largest relative parameter difference to DDP:",
          [{v: f"{_max_rel(res[v]['params'], res['ddp']['params']):.2g}" for v in variants} for res in results])
    # Measured on CPU (torch 2.14): all three bit-equal to DDP (world 2: x * 0.5 and a + b are exact and
    # order-free, and aot_eager runs the eager ops); the compiled step gets 1e-6 of room for a decomposition.
    _check_against_ddp(results, ["ddp_copies", "explicit", "graph"], tol=0.0)
    _check_against_ddp(results, ["compile"], tol=1e-6)
    for res in results:
        assert _max_rel(res["alone"]["params"], res["ddp"]["params"]) > 1e-4  # the all-reduce is not a no-op
    assert _max_rel(results[1]["alone"]["params"], results[0]["alone"]["params"]) > 1e-4
    (before0, after0), (before1, after1) = results[0]["broadcast"], results[1]["broadcast"]
    assert all(torch.equal(after0[k], before0[k]) and torch.equal(after1[k], before0[k]) for k in before0)
    assert not torch.equal(before1["0.weight"], before0["0.weight"])
    assert not torch.equal(before1["1.running_mean"], before0["1.running_mean"])


def test_three_gloo_ranks_train_py_ddp_settings_equal_ddp_defaults(tmp_path):
    """train.py's DDP settings (gradients as bucket views, one product by 1/3 per bucket, no buffer broadcast)
    against DDP's defaults at a world size that is not a power of two, where dividing instead of multiplying by
    the reciprocal would round differently."""
    results = _ranks(tmp_path, "gloo", ["ddp", "ddp_copies"], world=3)
    _check_against_ddp(results, ["ddp_copies"], tol=0.0)


def test_graph_runner_close_frees_the_graph_and_its_inputs_then_starts_over():
    model, opt, queue = setup()
    runner = GraphStep(capture=False, warmup=1)
    for it in range(3):  # warm-up, capture + replay, replay
        train_step(model, opt, crops_for(it), 0.1, it, CFG, queue, core=runner)
    assert runner.n_captures == 1 and len(runner._crops) == 3
    runner.close()
    assert runner._replay is None and runner._loss is None and runner._crops == []
    for it in range(3, 5):  # warm-up again, then a new capture
        train_step(model, opt, crops_for(it), 0.1, it, CFG, queue, core=runner)
    assert runner.n_captures == 2


def test_eager_graph_and_compile_equal_bit_for_bit_under_bf16_autocast(monkeypatch):
    """bf16 autocast as train.py makes it (step_autocast): eager, the recorded graph and the compiled step
    (aot_eager; the ops inductor would fuse are the same) give the same losses and parameters, bit for bit, across
    the freeze end. The trunk uses each weight twice a step (two crop resolutions); with autocast's weight-cast
    cache on, eager would add the two weight gradients in bf16 where a captured graph (cache off, as capture
    needs) and a compiled step (no cache) add them in fp32, and the parameters part after the first update.
    oneDNN is off: its bf16 kernels are not bit-reproducible from one call to the next on every CPU, PyTorch's
    own are."""
    autocast = step_autocast("cpu")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    runs = [(*setup(), core) for core in (None, GraphStep(capture=False, warmup=1), compiled_step_core("aot_eager"))]
    for it in range(4):
        losses = [train_step(m, o, crops_for(it), lr_at(it), it, CFG, q, autocast=autocast, core=core)
                  for m, o, q, core in runs]
        for name, loss in zip(("graph", "compile"), losses[1:], strict=True):
            torch.testing.assert_close(loss, losses[0], rtol=0, atol=0, msg=f"{name}: loss at step {it}")
    assert runs[1][3].n_captures == 1
    for m, o, q, _ in runs[1:]:
        assert_same_state(runs[0][0], runs[0][1], m, o, rtol=0, atol=0)
        torch.testing.assert_close(q.buffer, runs[0][2].buffer, rtol=0, atol=0)
    # and a caching autocast is refused, by every mode, before it runs anything
    model, opt, queue = setup()
    for core in (None, GraphStep(capture=False)):
        with pytest.raises(ValueError, match="cache"):
            train_step(model, opt, crops_for(0), 0.1, 0, CFG, queue, autocast=torch.autocast("cpu", torch.bfloat16),
                       core=core)
    assert queue.n_pushed == 0


# ----------------------------------------------------------------------------- CUDA: real capture and replay


def _graph_vs_eager_cuda(autocast_dtype, channels_last: bool, tol: float) -> GraphStep:
    dev = torch.device("cuda")
    eager_m, eager_opt, eager_q = setup(dev)
    graph_m, graph_opt, graph_q = setup(dev)
    if channels_last:
        eager_m, graph_m = (m.to(memory_format=torch.channels_last) for m in (eager_m, graph_m))
    assert autocast_dtype in (None, torch.bfloat16)
    autocast = step_autocast("cuda") if autocast_dtype else None  # as train.py makes it
    runner = GraphStep(capture=True, warmup=1)
    # warm-up at 0, captured at 1 (frozen, queue not in use); the replays cross both transitions at step 2, so
    # the flags must be read from the device at every replay, not baked into the graph. Deterministic cuDNN
    # algorithms: both sides run the same kernels, and 7 steps at lr 0.5 do not grow atomics' rounding noise.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for it in range(7):
            crops = crops_for(it, dev)
            if channels_last:
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
            a = train_step(eager_m, eager_opt, crops, lr_at(it), it, CFG, eager_q, autocast=autocast)
            b = train_step(graph_m, graph_opt, crops, lr_at(it), it, CFG, graph_q, autocast=autocast, core=runner)
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=f"loss at step {it}")
    assert runner.n_captures == 1
    assert_same_state(eager_m, eager_opt, graph_m, graph_opt, rtol=tol, atol=tol)
    torch.testing.assert_close(graph_q.buffer, eager_q.buffer, rtol=tol, atol=tol)
    return runner


@needs_cuda
def test_cuda_graph_step_equals_eager_fp32():
    _graph_vs_eager_cuda(None, channels_last=False, tol=1e-4)


@needs_cuda
def test_cuda_graph_step_equals_eager_bf16_channels_last():
    _graph_vs_eager_cuda(torch.bfloat16, channels_last=True, tol=2e-3)


@needs_cuda
def test_cuda_graph_replay_dispatches_only_the_copy_in():
    from tools.profile_step import OpCounter

    runner = _graph_vs_eager_cuda(None, channels_last=False, tol=1e-4)
    model, opt, queue = setup("cuda")
    train_step(model, opt, crops_for(0, "cuda"), 0.1, 0, CFG, queue, core=runner)  # new model: warm-up again
    assert runner.n_captures == 1
    runner.warmup = 0
    train_step(model, opt, crops_for(1, "cuda"), 0.1, 1, CFG, queue, core=runner)  # capture + replay
    counter = OpCounter()
    crops = crops_for(2, "cuda")
    with counter:
        train_step(model, opt, crops, 0.1, 2, CFG, queue, core=runner)
    assert runner.n_captures == 2 and counter.syncs == 0
    # 3 crop copies, lr and 2 flags filled, the loss cloned: no forward/backward op runs on the host side
    assert counter.total <= 10, counter.ops


@needs_cuda
def test_cuda_private_streams_are_never_handed_to_other_code():
    """torch.cuda.Stream() deals out 32 streams per priority level round robin, so the loader's and PyTorch's side
    streams can be one stream. Streams from private_stream (the ffcv decode stream, GraphStep's warm-up and capture
    stream) must not be among the default level's, however many are taken, nor among the highest level's (NCCL's
    opt-in high-priority streams) where the GPU has more than two levels."""
    from swav_fast.streams import private_stream

    runner = _graph_vs_eager_cuda(None, channels_last=False, tol=1e-4)
    mine = [private_stream(), private_stream(), runner._stream]
    assert len({s.cuda_stream for s in mine}) == 3
    others = [torch.cuda.Stream() for _ in range(70)]
    least, greatest = torch.cuda.Stream.priority_range()
    if least - greatest + 1 > 2:
        others += [torch.cuda.Stream(priority=greatest) for _ in range(70)]
    assert not {s.cuda_stream for s in mine} & {s.cuda_stream for s in others}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="2-rank NCCL capture needs 2 CUDA devices")
def test_cuda_two_nccl_ranks_captured_step_equals_ddp(tmp_path):
    results = _ranks(tmp_path, "nccl", ["ddp", "explicit", "graph_capture"])
    _check_against_ddp(results, ["explicit", "graph_capture"], tol=1e-4)


def test_profile_step_graph_mode_plumbing_on_cpu(monkeypatch):
    """tools/profile_step.py's graph row: its warm-up covers GraphStep's own, so the counted and timed steps are
    replays (here of the recorded ops: capture=False)."""
    import tools.profile_step as ps

    made = []
    monkeypatch.setattr(ps, "GraphStep", lambda: made.append(GraphStep(capture=False)) or made[-1])
    cfg = Config(arch="resnet18", nmb_crops=[2, 1], size_crops=[32, 16], min_scale_crops=[0.5, 0.5],
                 max_scale_crops=[1.0, 1.0], hidden_mlp=16, feat_dim=8, nmb_prototypes=10, queue_length=8,
                 batch_size=4, freeze_prototypes_niters=0)
    row = ps.profile("graph", cfg, DistInfo(0, 1, 0, torch.device("cpu")), 4, steps=1, warmup=1)
    assert len(made) == 1 and made[0].n_captures == 1 and made[0]._n_warm == made[0].warmup
    assert made[0]._replay is None  # closed: a real graph holding NCCL collectives would block destroy_process_group
    assert row["mode"] == "graph" and row["host_syncs_per_step"] == 0
