"""Sinkhorn-Knopp codes (swav_fast.sinkhorn) against REFERENCE section 2.

The official loop, written out here in float64 numpy:

    Q = exp(out / eps).T ; Q /= sum(Q)
    repeat n_iters: Q /= row sums ; Q /= K ; Q /= column sums ; Q /= B
    Q *= B ; return Q.T
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swav_fast.distributed import exit_now
from swav_fast.sinkhorn import sinkhorn


def official_sinkhorn(out: np.ndarray, eps: float, n_iters: int) -> np.ndarray:
    """main_swav.py's distributed_sinkhorn on one process, float64, loops over rows/columns spelled out."""
    q = np.exp(np.asarray(out, dtype=np.float64) / eps).T.copy()  # K x B
    k_rows, b_cols = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        for k in range(k_rows):  # each prototype gets 1/K of the mass
            q[k, :] /= q[k, :].sum()
            q[k, :] /= k_rows
        for b in range(b_cols):  # each sample gets 1/B of the mass
            q[:, b] /= q[:, b].sum()
            q[:, b] /= b_cols
    q *= b_cols
    return q.T


def random_scores(b: int, k: int, seed: int) -> torch.Tensor:
    """Cosine-like scores in [-1, 1], as prototypes and embeddings are unit vectors."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, k, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- hand-computed cases


def test_hand_computed_2x2_one_iteration():
    # exp(scores / 1) = [[1, 2], [3, 4]] (B = 2 samples, K = 2 prototypes).
    # Q = [[1, 3], [2, 4]] / 10; rows -> [[1/4, 3/4], [1/3, 2/3]] / 2 = [[1/8, 3/8], [1/6, 1/3]];
    # column sums 7/24 and 17/24 -> [[3/7, 9/17], [4/7, 8/17]] / 2, then * 2; codes = Q.T.
    scores = torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    codes = sinkhorn(scores, eps=1.0, n_iters=1)
    expected = torch.tensor([[3 / 7, 4 / 7], [9 / 17, 8 / 17]])
    torch.testing.assert_close(codes, expected, rtol=1e-6, atol=1e-7)
    # Per prototype the codes sum to 114/119 and 124/119, not B/K = 1: one iteration is not converged.
    torch.testing.assert_close(codes.sum(0), torch.tensor([114 / 119, 124 / 119]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_iters", [1, 2, 3])
def test_hand_computed_3x2_balanced_fixed_point(n_iters):
    # eps = 0.5 and scores = 0.5 ln M, so exp(scores / eps) = M = [[1, 2], [2, 1], [1, 1]] (B = 3, K = 2).
    # Q = M.T / 8 = [[1, 2, 1], [2, 1, 1]] / 8: both rows already hold 1/2 = 1/K, so the row step leaves it;
    # column sums 3/8, 3/8, 2/8 -> columns [1/3, 2/3], [2/3, 1/3], [1/2, 1/2], each / B. The rows of that
    # again hold 1/2 each, so every further iteration is a no-op.
    scores = 0.5 * torch.log(torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.0, 1.0]]))
    codes = sinkhorn(scores, eps=0.5, n_iters=n_iters)
    expected = torch.tensor([[1 / 3, 2 / 3], [2 / 3, 1 / 3], [1 / 2, 1 / 2]])
    torch.testing.assert_close(codes, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(codes.sum(0), torch.full((2,), 3 / 2), rtol=1e-6, atol=1e-7)


def test_zero_iterations_is_global_softmax_times_batch():
    scores = random_scores(6, 4, seed=1)
    eps = 0.3
    e = torch.exp(scores.double() / eps)
    expected = 6 * e / e.sum()
    torch.testing.assert_close(sinkhorn(scores, eps, 0).double(), expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- equality with the official loop


@pytest.mark.parametrize("b, k", [(1, 1), (1, 5), (2, 2), (5, 3), (7, 10), (13, 30), (33, 17), (64, 100),
                                  (96, 300)])
@pytest.mark.parametrize("eps, n_iters", [(0.05, 3), (0.05, 1), (0.03, 3), (0.1, 7), (1.0, 2)])
def test_matches_official_loop_float64(b, k, eps, n_iters):
    scores = random_scores(b, k, seed=b * 1000 + k)
    got = sinkhorn(scores, eps, n_iters)
    assert got.shape == (b, k) and got.dtype == torch.float32
    want = official_sinkhorn(scores.numpy(), eps, n_iters)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)


def test_default_arguments_are_eps_005_three_iterations():
    scores = random_scores(9, 12, seed=3)
    np.testing.assert_allclose(sinkhorn(scores).numpy(), official_sinkhorn(scores.numpy(), 0.05, 3),
                               rtol=2e-4, atol=1e-6)


def test_input_untouched_and_no_grad():
    scores = random_scores(8, 5, seed=4).requires_grad_()
    before = scores.detach().clone()
    codes = sinkhorn(scores, 0.05, 3)
    assert not codes.requires_grad
    assert torch.equal(scores.detach(), before)


# ----------------------------------------------------------------------------- marginals


@pytest.mark.parametrize("b, k", [(4, 3), (17, 5), (64, 30), (10, 200)])
@pytest.mark.parametrize("n_iters", [1, 3, 8])
def test_each_sample_code_sums_to_one(b, k, n_iters):
    # The last operation is a column (per-sample) normalisation to 1/B, then * B: rows of the result sum to 1.
    codes = sinkhorn(random_scores(b, k, seed=k), 0.05, n_iters)
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(b), rtol=0, atol=2e-6)
    # Mass is B in all.
    assert math.isclose(codes.double().sum().item(), b, rel_tol=1e-5)


def _explicit_iteration(codes: torch.Tensor) -> torch.Tensor:
    """One more official iteration applied to codes returned by sinkhorn, with the row marginal checked."""
    b, k = codes.shape
    q = codes.double().t() / b  # back to the state after the last column step: each column sums to 1/B
    q = q / q.sum(dim=1, keepdim=True) / k
    # After the row step (and only there) each prototype holds exactly 1/K of the mass.
    torch.testing.assert_close(q.sum(1), torch.full((k,), 1 / k, dtype=torch.float64))
    q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


@pytest.mark.parametrize("b, k", [(5, 3), (16, 7), (30, 40)])
@pytest.mark.parametrize("n_iters", [1, 2, 3])
def test_one_more_iteration_equals_explicit_row_then_column_step(b, k, n_iters):
    scores = random_scores(b, k, seed=7 * b + k)
    after = _explicit_iteration(sinkhorn(scores, 0.1, n_iters))
    torch.testing.assert_close(sinkhorn(scores, 0.1, n_iters + 1).double(), after, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("b, k", [(37, 11), (12, 12), (20, 50)])
def test_prototype_marginal_converges_to_b_over_k(b, k):
    # After the final column step the per-prototype sums are B/K only approximately (the column step moves
    # them); the error shrinks with the iterations and vanishes at convergence.
    scores = random_scores(b, k, seed=b + k)
    errors = [(sinkhorn(scores, 0.05, n).double().sum(0) - b / k).abs().max().item() for n in (1, 3, 30, 2000)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-4
    codes = sinkhorn(scores, 0.05, 2000)
    torch.testing.assert_close(codes.sum(1), torch.ones(b), rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, k", [(64, 3000), (7, 13)])
def test_half_precision_input_gives_fp32_without_overflow(dtype, b, k):
    scores = random_scores(b, k, seed=11)
    scores[0, 0], scores[-1, -1] = 1.0, -1.0  # exp(+-20) at eps 0.05: exp(20) > fp16 max
    low = scores.to(dtype)
    if dtype is torch.float16:
        assert torch.isinf(torch.exp(low / 0.05)).any()  # why the exp must be taken in fp32
    codes = sinkhorn(low, 0.05, 3)
    assert codes.dtype == torch.float32
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(b), rtol=0, atol=2e-6)
    want = official_sinkhorn(low.float().numpy(), 0.05, 3)
    np.testing.assert_allclose(codes.numpy(), want, rtol=2e-4, atol=1e-6)


# ----------------------------------------------------------------------------- distributed (gloo, 2 ranks)


def _dist_worker(rank: int, world: int, init_file: str, scores: torch.Tensor, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b_local = scores.shape[0] // world
        local = scores[rank * b_local:(rank + 1) * b_local]
        codes = sinkhorn(local, 0.05, 3, process_group=dist.group.WORLD)
        torch.save(codes, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()
    exit_now(0)  # a finished rank skips the interpreter's teardown (see exit_process)


@pytest.mark.parametrize("b_local, k", [(5, 7)])
def test_two_rank_gloo_equals_one_process_on_concatenated_batch(tmp_path, b_local, k):
    world = 2
    scores = random_scores(world * b_local, k, seed=21)
    out = str(tmp_path / "codes")
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "store"), scores, out), nprocs=world, join=True)
    got = torch.cat([torch.load(f"{out}.{r}") for r in range(world)])
    single = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.numpy(), official_sinkhorn(scores.numpy(), 0.05, 3), rtol=2e-4, atol=1e-6)
    # The collectives matter: each half on its own gives different codes.
    assert not torch.allclose(sinkhorn(scores[:b_local], 0.05, 3), single[:b_local], rtol=1e-3, atol=1e-4)
