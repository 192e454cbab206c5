"""Fused Sinkhorn-Knopp (REFERENCE section 2) in Triton: the same codes as `swav_fast.sinkhorn.sinkhorn`.

Algebra. With E = exp(S / eps) (S: scores [B, K]), every iterate of the reference is Q[k, b] = E[b, k] r[k] c[b]
for a per-prototype vector r and a per-sample vector c. A row step sets r[k] = 1 / (K sum_b E[b, k] c[b]) and a
column step sets c[b] = 1 / (B sum_k E[b, k] r[k]): the previous r (resp. c) cancels, and so do the global
total and the constants K and B (each only rescales a vector that the next step renormalises). What remains:

    P_1[k] = sum_b E[b, k]                                  (all-reduced over ranks)
    P_i[k] = sum_b E[b, k] / s_i[b],  s_i[b] = sum_k E[b, k] / P_{i-1}[k]     (P_i all-reduced; s_i local)
    codes[b, k] = (E[b, k] / P_n[k]) / sum_k' (E[b, k'] / P_n[k'])

so n_iters iterations are n_iters + 1 passes over S, and only K-vectors live between them. Kernels:
- `_prototype_sums_kernel`: one pass. A program takes B-tiles of whole rows; per tile it computes s[b] (needs all
  K of a row: the tile spans K) and immediately adds E / s into a per-program accumulator over K. Programs are
  persistent (grid = a few per SM), so the partial sums are [n_programs, K] (deterministic two-phase reduce:
  `torch.sum` over programs, then `dist.all_reduce` of those K values, then the next pass).
- `_codes_kernel`: the last pass, writes codes = E r / rowsum(E r) once, in fp32.

What is stored: nothing of size B x K but the output; exp(S / eps) is recomputed in every pass from S as given
(bf16 or fp32), because re-reading S (2 or 4 bytes per element, mostly from L2 for bf16 at the real shapes) is
cheaper than writing and re-reading an fp32 E (4 + 4 n_iters bytes per element), and one exp2 per element is
far below the memory time. Memory traffic: pass i reads S once (B K elem bytes) and writes/reads
n_programs K fp32 partials; the last pass reads S and writes B K fp32. For n_iters = 3, bf16, K 3000, B 3904:
4 x 23.4 MB + 46.8 MB ~ 140 MB, plus ~3 x 2 x 3 MB of partials.
With K <= 4096 a whole row tile stays in registers (one read of S per pass); above, the kernels loop over K in
chunks twice per tile (the second read hits L2) and accumulate the partial row in global memory.

Numerics: fp32 throughout, exp2(S * log2(e) / eps), no max-subtraction (as the official default); relative
error vs the reference ~1e-6. Communication: n_iters all-reduces of K values; the reference's all-reduced
scalar total cancels exactly and is only all-reduced (and used) for n_iters == 0. No host sync, no branch on
tensor values; launch parameters depend only on shapes (and the device's SM count).

CPU tensors run only under TRITON_INTERPRET=1 (set before this module is imported); otherwise use the
reference `swav_fast.sinkhorn.sinkhorn` on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from functools import cache

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.distributed.distributed_c10d import _resolve_process_group

__all__ = ["KernelConfig", "KernelVariant", "kernel_configs", "kernel_variants", "select_config", "sinkhorn_fused"]

MAX_SINGLE_K = 4096  # K (padded to a power of two) up to this: a row tile is held in registers
CHUNK_K = 1024  # above: K is walked in chunks of this many prototypes
TILE_ELEMS = 8192  # elements of S a program holds per step (~32 fp32 values per thread)
ROWS_PER_PROGRAM = 256  # a B-tile is made smaller until there are about B / this many tiles (parallelism at small B)
CPU_PROGRAMS = 3  # interpreter: few programs, so that the persistent loop runs several tiles
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile_rows(s_ptr, t, rows, n_rows, stride_b, BLOCK_B: tl.constexpr):
    """B-tile t: its row mask, its row offsets (int64, for B x K beyond 2**31) and the pointers to its rows."""
    offs_b = t * BLOCK_B + rows
    offs_b64 = offs_b.to(tl.int64)
    return offs_b < n_rows, offs_b64, s_ptr + offs_b64[:, None] * stride_b


@triton.jit
def _exp_tile(row_ptrs, offs_k, mask_b, n_protos, scale):
    """E = exp(S / eps) on one [BLOCK_B, BLOCK_K] tile (exp2 of the scores times log2(e) / eps); 0 outside."""
    mask_k = offs_k < n_protos
    x = tl.load(row_ptrs + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=float("-inf"))
    return tl.exp2(x.to(tl.float32) * scale)


@triton.jit
def _inv_p(p_ptr, offs_k, n_protos):
    """r = 1 / p on a K-chunk (1 outside K)."""
    return 1.0 / tl.load(p_ptr + offs_k, mask=offs_k < n_protos, other=1.0)


@triton.jit
def _row_sums(row_ptrs, p_ptr, mask_b, cols, n_protos, scale, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k E[b, k] r[k] for the rows of a B-tile, K in BLOCK_K chunks; 1 on padded rows (their E is 0)."""
    s = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, n_protos, BLOCK_K):
        offs_k = k0 + cols
        s += tl.sum(_exp_tile(row_ptrs, offs_k, mask_b, n_protos, scale) * _inv_p(p_ptr, offs_k, n_protos)[None, :],
                    axis=1)
    return tl.where(mask_b, s, 1.0)


@triton.jit
def _prototype_sums_kernel(s_ptr, p_ptr, part_ptr, n_rows, n_protos_v, stride_v, n_tiles, scale,
                           FIRST: tl.constexpr, VEC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                           SINGLE: tl.constexpr):
    """part[pid, k] = sum over this program's rows b of E[b, k] c[b], with c = 1 (FIRST) or 1 / sum_k E r."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    # K and the row stride are passed divided by VEC (a power of two dividing both) so that the compiler knows
    # row starts and the K mask are VEC-aligned and can vectorise loads and stores.
    n_protos = n_protos_v * VEC
    stride_b = stride_v * VEC
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_K)
    part_row = part_ptr + pid * n_protos
    if SINGLE:  # all of K in one chunk: r is loaded once, each tile read once
        r = tl.full([BLOCK_K], 1.0, tl.float32)
        if not FIRST:
            r = _inv_p(p_ptr, cols, n_protos)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for t in range(pid, n_tiles, n_prog):
            mask_b, _, row_ptrs = _tile_rows(s_ptr, t, rows, n_rows, stride_b, BLOCK_B)
            e = _exp_tile(row_ptrs, cols, mask_b, n_protos, scale)
            if FIRST:
                acc += tl.sum(e, axis=0)
            else:
                c = 1.0 / tl.where(mask_b, tl.sum(e * r[None, :], axis=1), 1.0)  # padded rows have e = 0
                acc += tl.sum(e * c[:, None], axis=0)
        tl.store(part_row + cols, acc, mask=cols < n_protos)
    else:
        for t in range(pid, n_tiles, n_prog):
            mask_b, _, row_ptrs = _tile_rows(s_ptr, t, rows, n_rows, stride_b, BLOCK_B)
            c = tl.full([BLOCK_B], 1.0, tl.float32)
            if not FIRST:
                c = 1.0 / _row_sums(row_ptrs, p_ptr, mask_b, cols, n_protos, scale, BLOCK_B, BLOCK_K)
            for k0 in range(0, n_protos, BLOCK_K):
                offs_k = k0 + cols
                mask_k = offs_k < n_protos
                col = tl.sum(_exp_tile(row_ptrs, offs_k, mask_b, n_protos, scale) * c[:, None], axis=0)
                # The program owns its partial row: the first tile stores, later tiles add to it. The barrier
                # makes the previous tile's stores (by other threads of this program: the compiler may give the
                # load and the store different layouts) visible before they are read back.
                tl.debug_barrier()
                prev = tl.load(part_row + offs_k, mask=mask_k & (t != pid), other=0.0)
                tl.store(part_row + offs_k, prev + col, mask=mask_k)


@triton.jit
def _codes_kernel(s_ptr, p_ptr, out_ptr, n_rows, n_protos_v, stride_v, n_tiles, scale,
                  ROWNORM: tl.constexpr, VEC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                  SINGLE: tl.constexpr):
    """out[b, k] = E[b, k] r[k] (/ sum_k E[b, k] r[k] if ROWNORM), r = 1 / p; out is contiguous fp32 [B, K]."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_protos = n_protos_v * VEC
    stride_b = stride_v * VEC
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_K)
    if SINGLE:
        r = _inv_p(p_ptr, cols, n_protos)
        for t in range(pid, n_tiles, n_prog):
            mask_b, offs_b64, row_ptrs = _tile_rows(s_ptr, t, rows, n_rows, stride_b, BLOCK_B)
            q = _exp_tile(row_ptrs, cols, mask_b, n_protos, scale) * r[None, :]
            if ROWNORM:
                q = q * (1.0 / tl.where(mask_b, tl.sum(q, axis=1), 1.0))[:, None]
            tl.store(out_ptr + offs_b64[:, None] * n_protos + cols[None, :], q,
                     mask=mask_b[:, None] & (cols < n_protos)[None, :])
    else:
        for t in range(pid, n_tiles, n_prog):
            mask_b, offs_b64, row_ptrs = _tile_rows(s_ptr, t, rows, n_rows, stride_b, BLOCK_B)
            out_rows = out_ptr + offs_b64[:, None] * n_protos
            inv = tl.full([BLOCK_B], 1.0, tl.float32)
            if ROWNORM:
                inv = 1.0 / _row_sums(row_ptrs, p_ptr, mask_b, cols, n_protos, scale, BLOCK_B, BLOCK_K)
            for k0 in range(0, n_protos, BLOCK_K):
                offs_k = k0 + cols
                q = (_exp_tile(row_ptrs, offs_k, mask_b, n_protos, scale) * _inv_p(p_ptr, offs_k, n_protos)[None, :]
                     * inv[:, None])
                tl.store(out_rows + offs_k[None, :], q, mask=mask_b[:, None] & (offs_k < n_protos)[None, :])


# ----------------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters; a function of (B, K, row stride) only."""

    block_b: int  # rows per tile
    block_k: int  # prototypes per tile (all of them, padded, when single)
    single: bool  # whole row tile in registers (one read of S per pass) vs. chunks over K
    vec: int  # power of two (<= 16) dividing K and the row stride: alignment hint for vector loads/stores
    num_warps: int
    num_stages: int = 1  # the loops are not software-pipelined: each step's tile is consumed at once
    programs_per_sm: int = 2  # persistent grid: this many programs per SM (capped by the number of tiles)


@dataclass(frozen=True)
class KernelVariant:
    """One compiled specialisation: what `triton.compile` needs to build it ahead of time."""

    kernel: object  # the @triton.jit function
    constexprs: dict
    signature: dict  # argument name -> Triton type ('*bf16', 'i32', 'fp32', or 'constexpr')
    num_warps: int
    num_stages: int


def _pow2_divisor(n: int, cap: int = 16) -> int:
    v = 1
    while v < cap and n % (2 * v) == 0:
        v *= 2
    return v


def select_config(n_rows: int, n_protos: int, row_stride: int | None = None) -> KernelConfig:
    """The configuration `sinkhorn_fused` uses for scores [n_rows, n_protos] with the given row stride."""
    row_stride = n_protos if row_stride is None else row_stride
    vec = _pow2_divisor(math.gcd(n_protos, row_stride)) if n_protos > 0 else 1
    k_pad = max(16, triton.next_power_of_2(max(n_protos, 1)))
    if k_pad <= MAX_SINGLE_K:
        block_k, single = k_pad, True
    else:
        block_k, single = CHUNK_K, False
    rows_wanted = triton.next_power_of_2(max(1, triton.cdiv(n_rows, ROWS_PER_PROGRAM)))
    block_b = max(1, min(TILE_ELEMS // block_k, rows_wanted, 64))
    num_warps = max(1, min(8, block_b * block_k // 1024))
    return KernelConfig(block_b=block_b, block_k=block_k, single=single, vec=vec, num_warps=num_warps)


def kernel_configs(n_rows: int, n_protos: int) -> list[KernelConfig]:
    """Every configuration `sinkhorn_fused` can pick for contiguous scores [n_rows, n_protos]."""
    return [select_config(n_rows, n_protos)]


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def kernel_variants(n_rows: int, n_protos: int,
                    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
                    ) -> list[KernelVariant]:
    """Every kernel specialisation launched for contiguous scores [n_rows, n_protos] of the given dtypes
    (any n_iters), for ahead-of-time compilation. Scalars are typed as the JIT types them (i32, fp32); the
    JIT additionally marks 16-byte-aligned pointers, as done here."""
    out = []
    for cfg in kernel_configs(n_rows, n_protos):
        for dtype in dtypes:
            for kernel, flag in ((_prototype_sums_kernel, "FIRST"), (_codes_kernel, "ROWNORM")):
                for value in (True, False):
                    third = "part_ptr" if kernel is _prototype_sums_kernel else "out_ptr"
                    constexprs = {flag: value, "VEC": cfg.vec, "BLOCK_B": cfg.block_b, "BLOCK_K": cfg.block_k,
                                  "SINGLE": cfg.single}
                    signature = {"s_ptr": f"*{_TRITON_DTYPES[dtype]}", "p_ptr": "*fp32", third: "*fp32",
                                 "n_rows": "i32", "n_protos_v": "i32", "stride_v": "i32", "n_tiles": "i32",
                                 "scale": "fp32", **dict.fromkeys(constexprs, "constexpr")}
                    out.append(KernelVariant(kernel, constexprs, signature, cfg.num_warps, cfg.num_stages))
    return out


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _is_interpreted(kernel) -> bool:
    return not isinstance(kernel, triton.runtime.jit.JITFunction)


# ----------------------------------------------------------------------------------------------------- entry


def sinkhorn_fused(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3,
                   process_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Codes [B_local, K] (fp32, rows sum to 1) for scores [B_local, K]; same contract as `sinkhorn`.

    Called through the custom op `torch.ops.swav_fast.sinkhorn_fused`, so that torch.compile treats it as one
    opaque op with a known output (fullgraph=True does not trace the launch code, only calls it) while eager
    calls and CUDA-graph captures run the launches as they are. The group travels as its name.
    """
    return _sinkhorn_op(scores.detach(), float(eps), int(n_iters),
                        "" if process_group is None else process_group.group_name)


@torch.library.custom_op("swav_fast::sinkhorn_fused", mutates_args=())
def _sinkhorn_op(scores: torch.Tensor, eps: float, n_iters: int, group_name: str) -> torch.Tensor:
    group = _resolve_process_group(group_name) if group_name else None
    with torch.no_grad():
        return _sinkhorn_fused(scores, eps, n_iters, group)


@_sinkhorn_op.register_fake
def _sinkhorn_op_fake(scores: torch.Tensor, eps: float, n_iters: int, group_name: str) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, K], got shape {tuple(scores.shape)}")
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _sinkhorn_fused(scores: torch.Tensor, eps: float, n_iters: int, process_group: dist.ProcessGroup | None,
                    config: KernelConfig | None = None, n_programs: int | None = None) -> torch.Tensor:
    """`sinkhorn_fused` with the configuration and the persistent grid size overridable (tests)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, K], got shape {tuple(scores.shape)}")
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}")
    if scores.device.type == "cpu" and not (os.environ.get("TRITON_INTERPRET") == "1"
                                            and _is_interpreted(_codes_kernel)):
        raise RuntimeError("sinkhorn_fused runs Triton kernels and needs CUDA tensors; on CPU use the reference "
                           "swav_fast.sinkhorn.sinkhorn (or set TRITON_INTERPRET=1 before importing "
                           "swav_fast.kernels.sinkhorn_triton, as the tests do)")
    scores = scores.detach()
    if scores.dtype not in _TRITON_DTYPES:
        scores = scores.float()
    if scores.stride(1) != 1 and scores.shape[1] > 1:
        scores = scores.contiguous()
    n_rows, n_protos = scores.shape
    row_stride = scores.stride(0) if n_rows > 1 else n_protos
    cfg = config or select_config(n_rows, n_protos, row_stride)
    if n_protos % cfg.vec or row_stride % cfg.vec:
        raise ValueError(f"vec {cfg.vec} must divide K {n_protos} and the row stride {row_stride}")

    n_tiles = triton.cdiv(n_rows, cfg.block_b)
    if n_programs is None:
        per_device = CPU_PROGRAMS if scores.device.type == "cpu" else _sm_count(scores.device.index or 0) * \
            cfg.programs_per_sm
        n_programs = per_device
    # At most one program per tile (a program without a tile would leave its partial row unwritten in the
    # chunked path); with no rows at all the single program's partial row is the zeros allocated here.
    grid = (max(1, min(n_programs, n_tiles)),)
    args = dict(n_rows=n_rows, n_protos_v=n_protos // cfg.vec, stride_v=row_stride // cfg.vec, n_tiles=n_tiles,
                scale=_LOG2E / eps, VEC=cfg.vec, BLOCK_B=cfg.block_b, BLOCK_K=cfg.block_k, SINGLE=cfg.single,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    device = scores.device
    partials = (torch.zeros if n_tiles == 0 else torch.empty)((grid[0], n_protos), dtype=torch.float32, device=device)
    codes = torch.empty((n_rows, n_protos), dtype=torch.float32, device=device)

    # Triton launches on the current CUDA device: make it the scores' device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        p = partials  # placeholder pointer for the first pass, never read
        for i in range(max(n_iters, 1)):
            _prototype_sums_kernel[grid](scores, p, partials, FIRST=i == 0, **args)
            p = partials.sum(dim=0)
            if process_group is not None and n_iters > 0:
                dist.all_reduce(p, group=process_group)
        if n_iters == 0:  # codes = B E / total (the one case where the global total does not cancel)
            world = dist.get_world_size(process_group) if process_group is not None else 1
            total = p.sum()
            if process_group is not None:
                dist.all_reduce(total, group=process_group)
            p = (total / (n_rows * world)).expand(n_protos).contiguous()
        _codes_kernel[grid](scores, p, codes, ROWNORM=n_iters > 0, **args)
    return codes
