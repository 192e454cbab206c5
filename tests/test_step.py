"""The training step (swav_fast.step) against the official per-iteration procedure (REFERENCE sections 1-5)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swav_fast.config import Config
from swav_fast.model import SwAVModel
from swav_fast.optim import LARS
from swav_fast.queue import EmbeddingQueue
from swav_fast.sinkhorn import sinkhorn
from swav_fast.step import assignment_codes, train_step


def unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def filled_queue(n_assign: int, length: int, dim: int, bs: int, g: torch.Generator) -> EmbeddingQueue:
    q = EmbeddingQueue(n_assign, length, dim, bs, "cpu")
    for _ in range(length // bs):
        q.push([unit_rows(bs, dim, g) for _ in range(n_assign)])
    assert q.in_use
    return q


@pytest.mark.parametrize("crops_for_assign, n_crops", [([0, 1], 4), ([1], 3), ([2, 0], 3)])
@pytest.mark.parametrize("bs, length", [(4, 8), (3, 12), (5, 5)])
def test_assignment_codes_with_queue_in_use(crops_for_assign, n_crops, bs, length):
    dim, k = 6, 7
    g = torch.Generator().manual_seed(bs * 100 + length)
    queue = filled_queue(len(crops_for_assign), length, dim, bs, g)
    old = queue.buffer.clone()
    z = unit_rows(n_crops * bs, dim, g)
    w = unit_rows(k, dim, g)
    scores = z @ w.t()
    codes = assignment_codes(scores, z, w, queue, crops_for_assign, bs, 0.05, 3)
    for i, c in enumerate(crops_for_assign):
        # By hand: cat(queue embeddings @ current prototypes, this crop's scores) -> sinkhorn -> last bs rows.
        out = torch.cat((old[i] @ w.t(), scores[c * bs:(c + 1) * bs]))
        want = sinkhorn(out, 0.05, 3)[-bs:]
        torch.testing.assert_close(codes[i], want, rtol=1e-5, atol=1e-7)
        assert codes[i].shape == (bs, k)
        # The queue changes the codes (B = length + bs in the column marginal).
        assert not torch.allclose(codes[i], sinkhorn(scores[c * bs:(c + 1) * bs], 0.05, 3), atol=1e-4)
        # The batch embeddings of crop c are pushed on top of block i; the rest shifts down by one batch.
        torch.testing.assert_close(queue.buffer[i, :bs], z[c * bs:(c + 1) * bs], rtol=0, atol=0)
        torch.testing.assert_close(queue.buffer[i, bs:], old[i, :-bs], rtol=0, atol=0)


def test_assignment_codes_queue_not_yet_in_use_still_pushes():
    bs, dim, k = 4, 5, 6
    g = torch.Generator().manual_seed(0)
    queue = EmbeddingQueue(2, 12, dim, bs, "cpu")
    queue.push([unit_rows(bs, dim, g) for _ in range(2)])
    assert not queue.in_use
    old = queue.buffer.clone()
    z = unit_rows(3 * bs, dim, g)
    w = unit_rows(k, dim, g)
    scores = z @ w.t()
    codes = assignment_codes(scores, z, w, queue, [0, 1], bs, 0.05, 3)
    for i in range(2):
        torch.testing.assert_close(codes[i], sinkhorn(scores[i * bs:(i + 1) * bs], 0.05, 3))
        assert torch.equal(queue.buffer[i, :bs], z[i * bs:(i + 1) * bs])
        assert torch.equal(queue.buffer[i, bs:], old[i, :-bs])
    assert queue.n_pushed == 2


def test_assignment_codes_without_queue_and_with_grad_inputs():
    bs, dim, k = 3, 4, 5
    g = torch.Generator().manual_seed(1)
    z = unit_rows(2 * bs, dim, g).requires_grad_()
    w = unit_rows(k, dim, g).requires_grad_()
    scores = z @ w.t()
    codes = assignment_codes(scores, z, w, None, [0, 1], bs, 0.1, 2)
    for i in range(2):
        assert not codes[i].requires_grad
        torch.testing.assert_close(codes[i], sinkhorn(scores.detach()[i * bs:(i + 1) * bs], 0.1, 2))


# ----------------------------------------------------------------------------- the whole step


def official_sinkhorn(out: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    q = torch.exp(out.float() / eps).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def official_forward(model: SwAVModel, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """main_swav.py's model forward: trunk per run of equal resolutions, head once, normalise, prototypes."""
    sizes = torch.tensor([c.shape[-1] for c in crops])
    idx_crops = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
    start, feats = 0, []
    for end in idx_crops.tolist():
        feats.append(model.forward_trunk(torch.cat(crops[start:end])))
        start = end
    x = model.projection_head(torch.cat(feats))
    x = F.normalize(x, dim=1, p=2)
    return x, model.prototypes(x)


def official_train_step(model, optimizer, crops, lr, iteration, cfg, queue, use_the_queue):
    """main_swav.py's train loop body (no amp, one process), with the LARC+SGD reference optimiser."""
    with torch.no_grad():
        w = model.prototypes.weight.data.clone()
        w = F.normalize(w, dim=1, p=2)
        model.prototypes.weight.copy_(w)
    embedding, output = official_forward(model, crops)
    embedding = embedding.detach()
    bs = crops[0].size(0)
    loss = 0
    for i, crop_id in enumerate(cfg.crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if queue is not None:
                if use_the_queue or not torch.all(queue[i, -1, :] == 0):
                    use_the_queue = True
                    out = torch.cat((torch.mm(queue[i], model.prototypes.weight.t()), out))
                queue[i, bs:] = queue[i, :-bs].clone()
                queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]
            q = official_sinkhorn(out, cfg.epsilon, cfg.sinkhorn_iterations)[-bs:]
        subloss = 0
        for v in np.delete(np.arange(np.sum(cfg.nmb_crops)), crop_id):
            x = output[bs * v: bs * (v + 1)] / cfg.temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (np.sum(cfg.nmb_crops) - 1)
    loss /= len(cfg.crops_for_assign)
    optimizer.zero_grad()
    loss.backward()
    if iteration < cfg.freeze_prototypes_niters:
        for name, p in model.named_parameters():
            if "prototypes" in name:
                p.grad = None
    for group in optimizer.sgd.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss.detach(), use_the_queue


class ApexLarcSgd:
    """torch.optim.SGD(momentum, wd 0) wrapped by apex LARC(clip=False)."""

    def __init__(self, params, lr, momentum, weight_decay, trust_coefficient, eps=1e-8):
        self.params = list(params)
        self.sgd = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=0.0)
        self.wd, self.trust, self.eps = weight_decay, trust_coefficient, eps

    def zero_grad(self):
        self.sgd.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            param_norm, grad_norm = torch.norm(p.data), torch.norm(p.grad.data)
            if param_norm != 0 and grad_norm != 0:
                adaptive_lr = self.trust * param_norm / (grad_norm + param_norm * self.wd + self.eps)
                p.grad.data += self.wd * p.data
                p.grad.data *= adaptive_lr
        self.sgd.step()


@pytest.mark.parametrize("use_queue", [False, True])
def test_train_step_matches_official_loop(use_queue):
    torch.manual_seed(0)
    bs, sizes = 4, [16, 16, 8, 8]
    cfg = Config(arch="resnet18", nmb_crops=[2, 2], size_crops=[16, 8], hidden_mlp=32, feat_dim=16,
                 nmb_prototypes=12, crops_for_assign=[0, 1], temperature=0.1, epsilon=0.05,
                 sinkhorn_iterations=3, freeze_prototypes_niters=1, batch_size=bs, wd=1e-2, lars_trust=0.01)
    model = SwAVModel(cfg.arch, cfg.hidden_mlp, cfg.feat_dim, cfg.nmb_prototypes)
    with torch.no_grad():
        model.prototypes.weight.mul_(2.0)  # not unit norm: the step must normalise them first
    ref = copy.deepcopy(model)
    hyper = dict(momentum=0.9, weight_decay=cfg.wd, trust_coefficient=cfg.lars_trust)
    opt = LARS(model.parameters(), lr=0.0, **hyper)
    ref_opt = ApexLarcSgd(ref.parameters(), lr=0.0, **hyper)
    length = bs  # full after one push: in use from the second iteration
    queue = EmbeddingQueue(2, length, cfg.feat_dim, bs, "cpu") if use_queue else None
    ref_queue = torch.zeros(2, length, cfg.feat_dim) if use_queue else None
    use_the_queue = False
    w0 = F.normalize(model.prototypes.weight.detach(), dim=1)  # what the first step's normalisation gives
    g = torch.Generator().manual_seed(1)
    lrs = [1.0, 0.8, 0.6]
    for it, lr in enumerate(lrs):
        # Each iteration starts both loops from the same state (ours, copied into the reference below), and its
        # update is compared: this tiny network at init is chaotic (a 1e-7 change of every parameter changes
        # some gradients by 1 %), so fp32 differences compounded over steps measure that, not the step.
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        start["prototypes.weight"] = F.normalize(start["prototypes.weight"], dim=1)
        crops = [torch.randn(bs, 3, s, s, generator=g) for s in sizes]
        loss = train_step(model, opt, crops, lr, it, cfg, queue=queue)
        ref_loss, use_the_queue = official_train_step(ref, ref_opt, crops, lr, it, cfg, ref_queue, use_the_queue)
        assert loss.dim() == 0 and not loss.requires_grad
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5, msg=f"loss at iteration {it}")
        if use_queue:
            assert queue.in_use == (it >= length // bs - 1)  # checked at the start of the next step
            torch.testing.assert_close(queue.buffer, ref_queue, rtol=1e-2, atol=1e-3)
        # Same update, up to fp32 noise that LARS's gradient normalisation amplifies: compare the difference
        # with how far this step moved the parameters.
        theirs = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            moved = (theirs[name] - start[name]).norm().item()
            diff = (p - theirs[name]).norm().item()
            assert diff <= 1e-2 * moved + 1e-6, f"{name} at iteration {it}: {diff} vs moved {moved}"
        for name, buf in model.named_buffers():
            torch.testing.assert_close(buf, dict(ref.named_buffers())[name], rtol=1e-4, atol=1e-5, msg=name)
        if it < cfg.freeze_prototypes_niters:
            # Frozen: only the normalisation touched them.
            torch.testing.assert_close(model.prototypes.weight.detach(), w0)
        with torch.no_grad():  # the reference goes on from our state
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                q.copy_(p)
                if "momentum_buffer" in ref_opt.sgd.state.get(q, {}):
                    ref_opt.sgd.state[q]["momentum_buffer"].copy_(opt.state[p]["momentum_buffer"])
            for b, rb in zip(model.buffers(), ref.buffers(), strict=True):
                rb.copy_(b)
            if use_queue:
                ref_queue.copy_(queue.buffer)
    assert not torch.allclose(model.prototypes.weight.detach(), w0, atol=1e-4)


def test_train_step_sets_lr_on_every_group():
    torch.manual_seed(2)
    cfg = Config(arch="resnet18", nmb_crops=[2], size_crops=[16], hidden_mlp=0, feat_dim=8, nmb_prototypes=5,
                 crops_for_assign=[0, 1], freeze_prototypes_niters=0, batch_size=2)
    model = SwAVModel(cfg.arch, cfg.hidden_mlp, cfg.feat_dim, cfg.nmb_prototypes)
    head = [p for n, p in model.named_parameters() if n.startswith(("projection_head", "prototypes"))]
    trunk = [p for n, p in model.named_parameters() if not n.startswith(("projection_head", "prototypes"))]
    opt = LARS([{"params": trunk}, {"params": head, "lr": 5.0}], lr=9.0)
    crops = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    loss = train_step(model, opt, crops, 0.25, 0, cfg)
    assert torch.isfinite(loss)
    assert [gr["lr"] for gr in opt.param_groups] == [0.25, 0.25]


def test_ddp_unwrap_is_identity_for_plain_model():
    from swav_fast.step import unwrap
    m = nn.Linear(2, 2)
    assert unwrap(m) is m
