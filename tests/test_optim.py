"""LARS (SGD + apex LARC) and the warmup + cosine schedule (swav_fast.optim) against REFERENCE section 5."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from swav_fast.optim import LARS, lr_schedule

# ----------------------------------------------------------------------------- the official optimiser, naively


class ApexLarcSgd:
    """torch.optim.SGD(momentum, weight_decay=0) wrapped by apex LARC(clip=False), as main_swav.py builds it.

    apex's LARC.step: for each parameter with a grad, if ||p|| != 0 and ||g|| != 0 (Python ifs on the norms):
    g += wd * p ; g *= trust * ||p|| / (||g|| + ||p|| * wd + eps). Then the wrapped SGD steps with its own
    weight decay set to 0.
    """

    def __init__(self, params, lr, momentum, weight_decay, trust_coefficient, eps):
        self.params = list(params)
        self.sgd = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=0.0)
        self.wd, self.trust, self.eps = weight_decay, trust_coefficient, eps

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            param_norm = torch.norm(p.data)
            grad_norm = torch.norm(p.grad.data)
            if param_norm != 0 and grad_norm != 0:
                adaptive_lr = self.trust * param_norm / (grad_norm + param_norm * self.wd + self.eps)
                p.grad.data += self.wd * p.data
                p.grad.data *= adaptive_lr
        self.sgd.step()


def make_params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=g)),  # a weight
        torch.nn.Parameter(torch.randn(3, generator=g) * 0.1),  # a bias
        torch.nn.Parameter(torch.zeros(5)),  # zero norm: gradient not scaled, no weight decay
        torch.nn.Parameter(torch.randn(2, 2, generator=g)),  # gets a zero gradient at some steps
        torch.nn.Parameter(torch.tensor(1.5)),  # 0-dim
        torch.nn.Parameter(torch.randn(6, generator=g)),  # grad None: untouched
    ]


def grads_for(step: int, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g) * 0.5 for p in params]
    if step % 2 == 0:
        grads[3] = torch.zeros_like(params[3])
    grads[5] = None
    return grads


def set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


HYPER = [
    dict(lr=0.6, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001, eps=1e-8),
    dict(lr=4.8, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02, eps=1e-8),
    dict(lr=0.3, momentum=0.0, weight_decay=0.05, trust_coefficient=0.5, eps=1e-3),
]


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("n_steps", [1, 2, 6])
def test_lars_matches_apex_larc_sgd(hyper, n_steps):
    ours = make_params(0)
    ref = [copy.deepcopy(p) for p in ours]
    untouched = ours[5].detach().clone()
    opt = LARS(ours, **hyper)
    ref_opt = ApexLarcSgd(ref, **hyper)
    for step in range(n_steps):
        grads = grads_for(step, ours)
        set_grads(ours, grads)
        set_grads(ref, grads)
        opt.step()
        ref_opt.step()
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"param {i} after step {step}")
    # The zero-norm parameter moved by -lr * g at the first step (no LARC scaling)...
    assert not torch.equal(ours[2], torch.zeros(5))
    # ... the grad-None parameter did not move and has no optimiser state.
    assert torch.equal(ours[5].detach(), untouched)
    assert ours[5] not in opt.state or not opt.state[ours[5]]
    # Momentum buffers agree with SGD's.
    for a, b in zip(ours[:5], ref[:5], strict=True):
        if not hyper["momentum"]:
            break
        torch.testing.assert_close(opt.state[a]["momentum_buffer"], ref_opt.sgd.state[b]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-7)


def test_lars_one_step_by_hand():
    # p = [3, 4] (norm 5), g = [0, 1] (norm 1), wd 0.1, trust 0.01, eps 0, lr 2, first step (buf = update):
    # local = 0.01 * 5 / (1 + 0.5) = 1/30; update = ([0, 1] + [0.3, 0.4]) / 30; p -= 2 * update.
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([0.0, 1.0])
    LARS([p], lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01, eps=0.0).step()
    torch.testing.assert_close(p.detach(), torch.tensor([3 - 2 * 0.3 / 30, 4 - 2 * 1.4 / 30]))


def test_lars_param_groups_use_their_own_hyperparameters():
    ours = make_params(1)[:3]
    ref = [copy.deepcopy(p) for p in ours]
    opt = LARS([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.05, "weight_decay": 0.0}], lr=0.7,
               momentum=0.9, weight_decay=0.01, trust_coefficient=0.01)
    ref_a = ApexLarcSgd(ref[:2], lr=0.7, momentum=0.9, weight_decay=0.01, trust_coefficient=0.01, eps=1e-8)
    ref_b = ApexLarcSgd(ref[2:], lr=0.05, momentum=0.9, weight_decay=0.0, trust_coefficient=0.01, eps=1e-8)
    for step in range(3):
        grads = grads_for(step, make_params(1))[:3]
        set_grads(ours, grads)
        set_grads(ref, grads)
        opt.step()
        ref_a.step()
        ref_b.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("freeze, n_steps", [(3, 7), (1, 3), (4, 4)])
def test_zero_grad_freeze_equals_none_grad_freeze(freeze, n_steps):
    # The step zero-masks the prototype grads in the freeze window; the official code sets them to None.
    masked = make_params(2)[:4]
    masked[2] = torch.nn.Parameter(torch.randn(5))  # the "prototypes": a nonzero tensor
    nones = [copy.deepcopy(p) for p in masked]
    ref = [copy.deepcopy(p) for p in masked]
    hyper = dict(lr=1.0, momentum=0.9, weight_decay=0.01, trust_coefficient=0.01, eps=1e-8)
    opt_m, opt_n, opt_r = LARS(masked, **hyper), LARS(nones, **hyper), ApexLarcSgd(ref, **hyper)
    frozen = [2, 3]
    initial = [p.detach().clone() for p in masked]
    for step in range(n_steps):
        grads = grads_for(step, make_params(2))[:4]
        grads[3] = torch.randn(2, 2)
        set_grads(masked, grads)
        set_grads(nones, grads)
        set_grads(ref, grads)
        if step < freeze:
            for i in frozen:
                masked[i].grad.zero_()
                nones[i].grad = None
                ref[i].grad = None
        opt_m.step()
        opt_n.step()
        opt_r.step()
        for i, (a, b, c) in enumerate(zip(masked, nones, ref, strict=True)):
            assert torch.equal(a, b), f"param {i} after step {step}"
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
        for i in frozen:  # frozen in the window, moving after it
            assert torch.equal(masked[i].detach(), initial[i]) == (step < freeze)


def test_frozen_params_do_not_move_inside_window():
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(torch.randn(3))
    before = p.detach().clone()
    opt = LARS([p, q], lr=1.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.1)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        q.grad = torch.randn(3)
        opt.step()
    assert torch.equal(p.detach(), before)
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))


@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(lr=0.1, momentum=-0.1), dict(lr=0.1, weight_decay=-1.0),
                                dict(lr=0.1, trust_coefficient=0.0)])
def test_lars_rejects_invalid_hyperparameters(kw):
    with pytest.raises(ValueError):
        LARS([torch.nn.Parameter(torch.ones(2))], **kw)


# ----------------------------------------------------------------------------- schedule


def official_schedule(base_lr, final_lr, epochs, spe, warmup_epochs, start_warmup):
    """main_swav.py, verbatim in structure."""
    warmup_lr_schedule = np.linspace(start_warmup, base_lr, spe * warmup_epochs)
    iters = np.arange(spe * (epochs - warmup_epochs))
    cosine_lr_schedule = np.array([final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(
        math.pi * t / (spe * (epochs - warmup_epochs)))) for t in iters])
    return np.concatenate((warmup_lr_schedule, cosine_lr_schedule))


SCHEDULES = [
    # base, final, epochs, steps/epoch, warmup epochs, start warmup
    (0.6, 0.0006, 200, 7, 0, 0.0),
    (4.8, 0.0048, 30, 5, 10, 0.3),
    (1.2, 0.0012, 8, 6, 1, 0.1),
    (0.3, 0.0, 3, 1, 1, 0.0),
    (2.0, 0.5, 4, 13, 0, 0.7),
]


@pytest.mark.parametrize("base, final, epochs, spe, warmup, start", SCHEDULES)
def test_lr_schedule(base, final, epochs, spe, warmup, start):
    lrs = lr_schedule(base, final, epochs, spe, warmup, start)
    np.testing.assert_allclose(lrs, official_schedule(base, final, epochs, spe, warmup, start), rtol=1e-12)
    assert len(lrs) == epochs * spe
    n_warm = warmup * spe
    n_cos = (epochs - warmup) * spe
    if warmup:
        assert lrs[0] == pytest.approx(start)
        # np.linspace ends on base_lr (with a single warmup iteration it holds only start_warmup).
        assert lrs[n_warm - 1] == pytest.approx(base if n_warm > 1 else start)
        # Linear: constant increments.
        np.testing.assert_allclose(np.diff(lrs[:n_warm]), (base - start) / (n_warm - 1) if n_warm > 1 else [])
    else:
        assert lrs[0] == pytest.approx(base)  # start_warmup is unused without warmup
    assert lrs[n_warm] == pytest.approx(base)  # t = 0 of the cosine
    last = final + 0.5 * (base - final) * (1 + math.cos(math.pi * (n_cos - 1) / n_cos))
    assert lrs[-1] == pytest.approx(last, rel=1e-12)
    assert lrs[-1] > final or base == final
    cos = lrs[n_warm:]
    assert np.all(np.diff(cos) < 0)
    assert np.all(cos >= final) and np.all(cos <= base + 1e-12)
    # Half-way through the cosine the rate is the midpoint of base and final.
    if n_cos % 2 == 0:
        assert cos[n_cos // 2] == pytest.approx((base + final) / 2)


def test_official_bs256_schedule_length_and_ends():
    # bs256 on 4 GPUs: 1281167 images / 256 = 5004 full steps (drop_last) per epoch; 200 epochs.
    lrs = lr_schedule(0.6, 0.0006, 200, 5004, 0, 0.0)
    assert lrs.shape == (200 * 5004,)
    assert lrs[0] == 0.6
    assert lrs[-1] == pytest.approx(0.0006, rel=1e-6)
