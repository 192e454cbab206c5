"""The swapped-prediction loss (swav_fast.loss) against REFERENCE section 4, written out as a double loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from swav_fast.loss import swapped_prediction_loss
from swav_fast.sinkhorn import sinkhorn
from swav_fast.step import assignment_codes


def reference_loss(scores: torch.Tensor, codes: list[torch.Tensor], crops_for_assign: list[int], n_crops: int,
                   temperature: float) -> torch.Tensor:
    """loss = mean_a( (1/(n_crops-1)) sum_{v != a} mean_b( -sum_k q_a[b,k] log softmax(s_v[b] / T)[k] ) )."""
    bs = scores.shape[0] // n_crops
    loss = scores.new_zeros(())
    for q, a in zip(codes, crops_for_assign, strict=True):
        subloss = scores.new_zeros(())
        for v in range(n_crops):
            if v == a:
                continue
            p = F.softmax(scores[v * bs:(v + 1) * bs] / temperature, dim=1)
            ce = scores.new_zeros(())
            for b in range(bs):
                ce = ce - (q[b] * torch.log(p[b])).sum()
            subloss = subloss + ce / bs
        loss = loss + subloss / (n_crops - 1)
    return loss / len(crops_for_assign)


def make_case(n_crops: int, bs: int, k: int, n_assign: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n_crops * bs, 8, generator=g), dim=1)
    w = F.normalize(torch.randn(k, 8, generator=g), dim=1)
    scores = z @ w.t()  # cosines in [-1, 1]
    codes = [torch.softmax(torch.randn(bs, k, generator=g) * 3, dim=1) for _ in range(n_assign)]
    return scores, codes


CASES = [
    # (n_crops, crops_for_assign)
    (2, [0, 1]),
    (2, [0]),
    (2, [1]),
    (3, [0, 1]),
    (3, [2]),
    (5, [0, 2]),
    (5, [4, 1]),
    (8, [0, 1]),
    (8, [0, 1, 2, 7]),
]


@pytest.mark.parametrize("n_crops, crops_for_assign", CASES)
@pytest.mark.parametrize("bs, k, temperature", [(4, 10, 0.1), (3, 7, 0.5), (1, 30, 0.1)])
def test_equals_double_loop_formula(n_crops, crops_for_assign, bs, k, temperature):
    scores, codes = make_case(n_crops, bs, k, len(crops_for_assign), seed=n_crops * 10 + bs)
    got = swapped_prediction_loss(scores, codes, crops_for_assign, n_crops, temperature)
    want = reference_loss(scores.double(), [q.double() for q in codes], crops_for_assign, n_crops, temperature)
    assert got.dim() == 0 and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_one_hot_codes_are_cross_entropy():
    # With hard codes, each term is F.cross_entropy(s_v / T, label of q_a).
    n_crops, bs, k, t = 3, 5, 6, 0.1
    scores, _ = make_case(n_crops, bs, k, 1, seed=5)
    labels = torch.tensor([0, 5, 2, 2, 1])
    codes = [F.one_hot(labels, k).float()]
    got = swapped_prediction_loss(scores, codes, [1], n_crops, t)
    want = (F.cross_entropy(scores[0:bs] / t, labels) + F.cross_entropy(scores[2 * bs:3 * bs] / t, labels)) / 2
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [3, 3000])
def test_collapse_value_is_log_k(k):
    # Equal scores for every prototype: softmax is uniform, the loss is ln K whatever the codes (REFERENCE 9).
    n_crops, bs = 4, 3
    scores = torch.full((n_crops * bs, k), 0.3)
    codes = [torch.softmax(torch.randn(bs, k), dim=1) for _ in range(2)]
    got = swapped_prediction_loss(scores, codes, [0, 1], n_crops, 0.1)
    assert math.isclose(got.item(), math.log(k), rel_tol=1e-5)


def test_bf16_scores_give_fp32_loss():
    n_crops, bs, k = 4, 4, 16
    scores, codes = make_case(n_crops, bs, k, 2, seed=9)
    low = scores.bfloat16()
    got = swapped_prediction_loss(low, codes, [0, 1], n_crops, 0.1)
    assert got.dtype == torch.float32
    want = reference_loss(low.double(), [q.double() for q in codes], [0, 1], n_crops, 0.1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_crops, crops_for_assign", [(2, [0, 1]), (4, [0, 1]), (5, [3]), (6, [1, 4, 0])])
def test_gradient_flows_to_scores_only(n_crops, crops_for_assign):
    bs, k, t = 4, 9, 0.1
    scores, _ = make_case(n_crops, bs, k, 0, seed=n_crops)
    scores.requires_grad_()
    z = F.normalize(torch.randn(n_crops * bs, 8), dim=1)
    # Codes as the step computes them: under no_grad from the scores, so they carry no graph.
    codes = assignment_codes(scores, z, torch.randn(k, 8), None, crops_for_assign, bs, 0.05, 3)
    assert all(not q.requires_grad and q.grad_fn is None for q in codes)
    for q, c in zip(codes, crops_for_assign, strict=True):
        torch.testing.assert_close(q, sinkhorn(scores.detach()[c * bs:(c + 1) * bs], 0.05, 3))
    loss = swapped_prediction_loss(scores, codes, crops_for_assign, n_crops, t)
    loss.backward()
    # d loss / d s_v[b] = sum_{a != v} (softmax(s_v[b] / T) - q_a[b]) / (T * bs * (n_crops - 1) * n_assign):
    # the codes are constants. Had the gradient gone through the codes too, this would not hold.
    with torch.no_grad():
        expected = torch.zeros_like(scores)
        for q, a in zip(codes, crops_for_assign, strict=True):
            for v in range(n_crops):
                if v != a:
                    p = F.softmax(scores[v * bs:(v + 1) * bs] / t, dim=1)
                    expected[v * bs:(v + 1) * bs] += (p - q) / (t * bs * (n_crops - 1) * len(crops_for_assign))
    torch.testing.assert_close(scores.grad, expected, rtol=1e-4, atol=1e-6)

