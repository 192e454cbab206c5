"""The fused Triton Sinkhorn (swav_fast.kernels.sinkhorn_triton) against the reference swav_fast.sinkhorn.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. `triton.jit` decides interpreted vs.
compiled when a kernel is defined, from TRITON_INTERPRET, so the interpreter runs happen in child processes
started with TRITON_INTERPRET=1; this process keeps the compiled kernels (used by the ahead-of-time compilation
test and the GPU test) and leaves the environment of other test modules untouched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triton
from conftest import free_port, needs_triton_interpreter
from triton.backends.compiler import GPUTarget

from swav_fast.distributed import exit_now
from swav_fast.kernels import sinkhorn_triton as st
from swav_fast.sinkhorn import sinkhorn

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
RTOL = 1e-5  # elementwise relative error allowed vs the reference (all codes are positive)


def random_scores(b: int, k: int, seed: int, dtype: torch.dtype = torch.float32, queue: int = 0,
                  extremes: bool = False) -> torch.Tensor:
    """Uniform scores in [-1, 1] ([b, k]); with queue > 0, real cosines (unit embeddings @ unit prototypes) of
    `queue` queue rows prepended to b batch rows, as the small-batch recipe feeds Sinkhorn."""
    g = torch.Generator().manual_seed(seed)
    if queue:
        z = torch.nn.functional.normalize(torch.randn(queue + b, 128, generator=g), dim=1)
        c = torch.nn.functional.normalize(torch.randn(k, 128, generator=g), dim=1)
        s = z @ c.t()
    else:
        s = torch.rand(b, k, generator=g) * 2 - 1
    if extremes:  # exp(+-20) at eps 0.05
        s[0, 0], s[-1, -1] = 1.0, -1.0
    return s.to(dtype)


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    if got.numel() == 0:
        return 0.0
    return ((got.double() - want.double()).abs() / want.double().abs()).max().item()


# ----------------------------------------------------------------------------- interpreter cases (child process)

_CHUNKED = dict(block_b=4, block_k=64, single=False, num_warps=4)  # forces the K-chunked path on small K

# id -> (B, K, queue rows, dtype, n_iters, eps, config override, n_programs, input layout)
CASES = {}
for _b, _k in [(7, 5), (64, 30), (100, 257), (300, 3000)]:
    for _dt in ("float32", "bfloat16"):
        for _n in (1, 3):
            CASES[f"{_b}x{_k}-{_dt}-it{_n}"] = (_b, _k, 0, _dt, _n, 0.05, None, None, "contiguous")
CASES.update({
    "queue96+32x300-float32": (32, 300, 96, "float32", 3, 0.05, None, None, "contiguous"),
    "queue96+32x300-bfloat16": (32, 300, 96, "bfloat16", 3, 0.05, None, None, "contiguous"),
    "queue384+64x3000-bfloat16": (64, 3000, 384, "bfloat16", 3, 0.05, None, None, "contiguous"),
    "1x1": (1, 1, 0, "float32", 3, 0.05, None, None, "contiguous"),
    "extremes-64x3000-float16": (64, 3000, 0, "float16", 3, 0.05, None, None, "extremes"),
    "extremes-33x3000-float32": (33, 3000, 0, "float32", 3, 0.05, None, None, "extremes"),
    "it0-64x30": (64, 30, 0, "float32", 0, 0.05, None, None, "contiguous"),
    "it7-eps0.1-50x77": (50, 77, 0, "float32", 7, 0.1, None, None, "contiguous"),
    "eps0.03-40x100": (40, 100, 0, "bfloat16", 3, 0.03, None, None, "contiguous"),
    "one-program-300x3000": (300, 3000, 0, "float32", 3, 0.05, None, 1, "contiguous"),
    "row-stride-41x37": (41, 37, 0, "float32", 3, 0.05, None, None, "sliced"),
    "transposed-29x48": (29, 48, 0, "bfloat16", 3, 0.05, None, None, "transposed"),
    "chunked-100x257-it3": (100, 257, 0, "float32", 3, 0.05, _CHUNKED, 2, "contiguous"),
    "chunked-100x257-bf16-it1": (100, 257, 0, "bfloat16", 1, 0.05, _CHUNKED, 3, "contiguous"),
    "chunked-64x3000-it3": (64, 3000, 0, "float32", 3, 0.05, dict(_CHUNKED, block_k=1024), 3, "contiguous"),
    "chunked-100x257-it0": (100, 257, 0, "float32", 0, 0.05, _CHUNKED, 2, "contiguous"),
    "chunked-3x20-more-programs-than-tiles": (3, 20, 0, "float32", 2, 0.05, _CHUNKED, 8, "contiguous"),
})


def case_scores(case_id: str) -> torch.Tensor:
    b, k, queue, dtype, _, _, _, _, layout = CASES[case_id]
    seed = sum(map(ord, case_id))
    if layout == "sliced":  # row stride K + 3, not a multiple of K's alignment
        return random_scores(b, k + 3, seed, getattr(torch, dtype))[:, :k]
    if layout == "transposed":
        return random_scores(k, b, seed, getattr(torch, dtype)).t()
    return random_scores(b, k, seed, getattr(torch, dtype), queue=queue, extremes=layout == "extremes")


def _interpreter_child(out_file: str) -> None:
    """Runs every case with the interpreted kernels (TRITON_INTERPRET=1 set by the parent) and saves codes."""
    assert not isinstance(st._codes_kernel, triton.runtime.jit.JITFunction), "kernels are not interpreted"
    results = {}
    for case_id, (_, _, _, _, n_iters, eps, config, n_programs, _) in CASES.items():
        scores = case_scores(case_id)
        before = scores.clone()
        if config is None and n_programs is None:
            codes = st.sinkhorn_fused(scores, eps, n_iters)
        else:
            cfg = None if config is None else st.KernelConfig(vec=st.select_config(*scores.shape).vec, **config)
            codes = st._sinkhorn_fused(scores, eps, n_iters, None, config=cfg, n_programs=n_programs)
        results[case_id] = (codes, torch.equal(scores, before))
    torch.save(results, out_file)


def _child_env() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sinkhorn_interp") / "codes.pt"
    code = f"import test_sinkhorn_triton as t; t._interpreter_child({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=_child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@needs_triton_interpreter
@pytest.mark.parametrize("case_id", list(CASES))
def test_interpreted_kernel_equals_reference(interpreted, case_id):
    _, _, _, _, n_iters, eps, _, _, _ = CASES[case_id]
    scores = case_scores(case_id)
    codes, untouched = interpreted[case_id]
    want = sinkhorn(scores, eps, n_iters)
    assert codes.dtype == torch.float32 and codes.shape == scores.shape and codes.is_contiguous()
    assert untouched
    assert torch.isfinite(codes).all()
    err = max_rel_err(codes, want)
    assert err <= RTOL, f"max relative error {err:.3g}"
    torch.testing.assert_close(codes.sum(1), torch.ones(scores.shape[0]) if n_iters else want.sum(1),
                               rtol=0, atol=3e-6)


@needs_triton_interpreter
def test_queue_case_batch_rows_are_what_training_uses(interpreted):
    # The step keeps codes[-bs:] of the queue ++ batch scores; those rows differ from Sinkhorn on the batch alone.
    codes, _ = interpreted["queue96+32x300-float32"]
    scores = case_scores("queue96+32x300-float32")
    assert max_rel_err(codes[-32:], sinkhorn(scores, 0.05, 3)[-32:]) <= RTOL
    assert max_rel_err(codes[-32:], sinkhorn(scores[-32:], 0.05, 3)) > 1e-2


# ----------------------------------------------------------------------------- configs and the CPU rule


@pytest.mark.parametrize("b", [1, 64, 3904, 8000, 10_000])
@pytest.mark.parametrize("k", [5, 3000, 4096, 4097, 30_000])
def test_select_config_is_among_kernel_configs_and_consistent(b, k):
    cfg = st.select_config(b, k)
    assert cfg in st.kernel_configs(b, k)
    assert k % cfg.vec == 0 and cfg.vec in (1, 2, 4, 8, 16)
    assert cfg.block_b & (cfg.block_b - 1) == 0 and cfg.block_k & (cfg.block_k - 1) == 0
    assert cfg.single == (cfg.block_k >= k)  # single: a tile spans all prototypes
    assert cfg.block_b * cfg.block_k <= st.TILE_ELEMS or cfg.block_b == 1


def test_cpu_without_interpreter_points_to_the_reference():
    if not isinstance(st._codes_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("this process was started with TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match=r"swav_fast\.sinkhorn\.sinkhorn"):
        st.sinkhorn_fused(random_scores(4, 3, seed=0))


# ----------------------------------------------------------------------------- distributed (gloo, 2 ranks)



def _dist_worker(rank: int, world: int, port: int, scores: torch.Tensor, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert not isinstance(st._codes_kernel, triton.runtime.jit.JITFunction), "kernels are not interpreted"
        calls = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        b_local = scores.shape[0] // world
        local = scores[rank * b_local:(rank + 1) * b_local]
        results = {}
        for n_iters in (3, 0):
            calls.clear()
            codes = st.sinkhorn_fused(local, 0.05, n_iters, process_group=dist.group.WORLD)
            results[n_iters] = (codes, list(calls))
        dist.all_reduce = real_all_reduce
        torch.save(results, f"{out_file}.{rank}")
        dist.barrier()  # rank 0 hosts the store: none may leave while another still uses it (exit_now is immediate)
    finally:
        dist.destroy_process_group()
    exit_now(0)  # a finished rank skips the interpreter's teardown (see exit_process)


@needs_triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_rank_gloo_equals_one_process_on_concatenated_batch(tmp_path, monkeypatch, dtype):
    world, b_local, k = 2, 45, 300
    scores = random_scores(world * b_local, k, seed=31, dtype=dtype, queue=60)[-world * b_local:]
    out = str(tmp_path / "codes")
    for key, value in _child_env().items():  # the children inherit it: their kernels are interpreted
        monkeypatch.setenv(key, value)
    mp.spawn(_dist_worker, args=(world, free_port(), scores, out), nprocs=world, join=True)
    results = [torch.load(f"{out}.{r}") for r in range(world)]
    for n_iters in (3, 0):
        got = torch.cat([res[n_iters][0] for res in results])
        single = sinkhorn(scores, 0.05, n_iters)
        assert max_rel_err(got, single) <= RTOL, n_iters
        # Only prototype sums (K values per iteration) cross ranks; the total only when it does not cancel.
        for res in results:
            assert res[n_iters][1] == ([k] * n_iters if n_iters else [1])
    # The collectives matter: each half on its own gives different codes.
    assert max_rel_err(sinkhorn(scores[:b_local], 0.05, 3), sinkhorn(scores, 0.05, 3)[:b_local]) > 1e-3


# ----------------------------------------------------------------------------- ahead-of-time compilation


REAL_SHAPES = [(b, 3000) for b in (64, 3904, 8000)]  # bs4096 recipe (64 per GPU), queue 3840 + 64, large
DEVICE_LIMITS = {90: dict(shared=228 * 1024, regs=64 * 1024), 80: dict(shared=164 * 1024, regs=64 * 1024)}


def _resource_usage(cubin: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                          check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert m, text
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()), strict=True))


@pytest.mark.parametrize("arch", [90, 80])
def test_aot_compile_every_config_for_real_shapes(arch, tmp_path, monkeypatch):
    if not isinstance(st._codes_kernel, triton.runtime.jit.JITFunction):
        # The whole run was started with TRITON_INTERPRET=1, under which Triton cannot compile: do it in a child.
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::test_aot_compile_every_config_for_real_shapes[{arch}]"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))  # really compile, with the shipped ptxas
    assert Path(triton.knobs.nvidia.ptxas.path).is_file()  # raises (fails, never skips) when there is none
    seen, report = set(), []
    for b, k in REAL_SHAPES:
        for v in st.kernel_variants(b, k):
            key = (v.kernel.fn.__name__, tuple(sorted(v.constexprs.items())), v.signature["s_ptr"], v.num_warps)
            if key in seen:
                continue
            seen.add(key)
            fn = v.kernel
            # Pointers 16-byte aligned, as the JIT marks torch allocations; K, strides unmarked (3000 % 16 != 0).
            attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name.endswith("_ptr")}
            src = triton.compiler.ASTSource(fn=fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
            cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
            assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
            assert re.search(rf"\.target sm_{arch}", ptx)
            use = _resource_usage(cubin, tmp_path)
            threads = 32 * v.num_warps
            assert compiled.metadata.shared <= DEVICE_LIMITS[arch]["shared"]
            assert use["shared"] <= DEVICE_LIMITS[arch]["shared"]
            assert 0 < use["regs"] <= 255 and use["regs"] * threads <= DEVICE_LIMITS[arch]["regs"]
            assert use["stack"] == 0 and use["local"] == 0, "register spills"
            # The alignment hints work: S is read and codes written with 16-byte vector accesses.
            assert "ld.global.v4" in ptx and "st.global.v4" in ptx
            report.append((key, compiled.metadata.shared, use["regs"]))
    # 2 configs (B 64; B 3904 and 8000) x 3 dtypes x 2 kernels x 2 flags.
    assert len(report) == 24
    print("\n".join(map(str, report)))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_iters", [3, 0])
def test_gpu_real_shape_equals_reference(dtype, n_iters):
    scores = random_scores(64, 3000, seed=5, dtype=dtype, queue=3840).cuda()
    got = st.sinkhorn_fused(scores, 0.05, n_iters)
    want = sinkhorn(scores, 0.05, n_iters)
    assert got.dtype == torch.float32 and got.shape == (3904, 3000)
    assert max_rel_err(got, want) <= RTOL
    uniform = random_scores(3904, 3000, seed=6, dtype=dtype, extremes=True).cuda()
    assert max_rel_err(st.sinkhorn_fused(uniform, 0.05, n_iters), sinkhorn(uniform, 0.05, n_iters)) <= RTOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("b, k", [(64, 3000), (8000, 3000), (100, 257), (500, 6001)])
def test_gpu_shapes_and_chunked_path(b, k):
    scores = random_scores(b, k, seed=b + k, dtype=torch.bfloat16).cuda()
    want = sinkhorn(scores, 0.05, 3)
    assert max_rel_err(st.sinkhorn_fused(scores, 0.05, 3), want) <= RTOL
    cfg = st.KernelConfig(block_b=4, block_k=512, single=False, vec=st.select_config(b, k).vec, num_warps=4)
    assert max_rel_err(st._sinkhorn_fused(scores, 0.05, 3, None, config=cfg), want) <= RTOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_timing_report():
    scores = random_scores(64, 3000, seed=7, dtype=torch.bfloat16, queue=3840).cuda()
    for _ in range(3):
        st.sinkhorn_fused(scores)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        st.sinkhorn_fused(scores)
    end.record()
    torch.cuda.synchronize()
    print(f"sinkhorn_fused K 3000 x B 3904 bf16: {start.elapsed_time(end) / 20:.3f} ms per call")
