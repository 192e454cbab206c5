"""SwAVModel (swav_fast.model) against REFERENCE section 1, with a torchvision ResNet as the independent trunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from swav_fast.model import SwAVModel, trunk_state_dict

HIDDEN, FEAT, K = 32, 16, 10


def make_model(seed: int = 0, hidden: int = HIDDEN) -> SwAVModel:
    torch.manual_seed(seed)
    return SwAVModel("resnet18", hidden_mlp=hidden, feat_dim=FEAT, n_prototypes=K)


def torchvision_trunk(model: SwAVModel) -> nn.Module:
    """A torchvision resnet18 holding the model's trunk weights, classifier removed (2048/512-d pooled)."""
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(trunk_state_dict(model.state_dict()), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    tv.fc = nn.Identity()
    tv.train(model.training)
    return tv


def head_by_hand(model: SwAVModel, feats: torch.Tensor, training: bool):
    """Linear -> BatchNorm1d -> ReLU -> Linear -> L2-normalise -> prototypes, spelled out with F."""
    h = model.projection_head
    x = F.linear(feats, h[0].weight, h[0].bias)
    bn = h[1]
    if training:
        mean, var = x.mean(0), x.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    x = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    x = torch.clamp(x, min=0)
    x = F.linear(x, h[3].weight, h[3].bias)
    z = x / x.norm(dim=1, keepdim=True)
    return z, z @ model.prototypes.weight.t()


def make_crops(sizes: list[int], bs: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, s, s, generator=g) for s in sizes]


def groups_of(sizes: list[int]) -> list[list[int]]:
    """Runs of consecutive equal resolutions (torch.unique_consecutive in the official forward)."""
    out: list[list[int]] = []
    for i, s in enumerate(sizes):
        if out and sizes[out[-1][-1]] == s:
            out[-1].append(i)
        else:
            out.append([i])
    return out


SIZE_LISTS = [[16, 16, 8, 8, 8], [16, 8, 16], [12, 12, 12], [16, 8]]


@pytest.mark.parametrize("sizes", SIZE_LISTS)
def test_eval_forward_equals_crop_by_crop(sizes):
    model = make_model()
    model.train()
    with torch.no_grad():
        model(make_crops([16, 16], bs=4, seed=9))  # give the BatchNorms non-trivial running statistics
    model.eval()
    crops = make_crops(sizes)
    with torch.no_grad():
        z, scores = model(crops)
        tv = torchvision_trunk(model)
        per_crop = [head_by_hand(model, tv(c), training=False) for c in crops]
    bs = crops[0].shape[0]
    assert z.shape == (len(crops) * bs, FEAT) and scores.shape == (len(crops) * bs, K)
    for i, (zi, si) in enumerate(per_crop):
        torch.testing.assert_close(z[i * bs:(i + 1) * bs], zi, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores[i * bs:(i + 1) * bs], si, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", SIZE_LISTS)
def test_train_forward_runs_trunk_per_resolution_group(sizes):
    model = make_model(seed=3)
    model.train()
    tv = torchvision_trunk(model)
    crops = make_crops(sizes, bs=2, seed=4)
    z, scores = model(crops)
    with torch.no_grad():
        feats = torch.cat([tv(torch.cat([crops[i] for i in grp])) for grp in groups_of(sizes)])
        z_ref, s_ref = head_by_hand(model, feats, training=True)
    torch.testing.assert_close(z.detach(), z_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores.detach(), s_ref, rtol=1e-4, atol=1e-5)
    # The trunk BatchNorms were updated once per group with the group's statistics, as in torchvision's run.
    ours, ref = model.state_dict(), tv.state_dict()
    for key in ("bn1.running_mean", "layer4.1.bn2.running_var", "layer2.0.downsample.1.running_mean",
                "bn1.num_batches_tracked"):
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-6)
    assert ours["bn1.num_batches_tracked"].item() == len(groups_of(sizes))


def test_train_forward_differs_from_crop_by_crop():
    # Batch statistics are shared within a resolution group: crop-by-crop would give other numbers.
    model = make_model(seed=5)
    model.train()
    crops = make_crops([16, 16, 8, 8], bs=2, seed=6)
    with torch.no_grad():
        z, _ = model(crops)
        tv = torchvision_trunk(model)
        feats = torch.cat([tv(c) for c in crops])
        z_sep, _ = head_by_hand(model, feats, training=True)
    assert not torch.allclose(z, z_sep, atol=1e-3)


@pytest.mark.parametrize("train", [True, False])
def test_embeddings_unit_norm_and_scores_are_cosines(train):
    model = make_model(seed=7)
    model.train(train)
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)  # scores = z @ W^T whatever the prototype norms
        z, scores = model(make_crops([16, 16, 8], bs=3, seed=8))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(9), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, z @ model.prototypes.weight.t(), rtol=1e-5, atol=1e-6)


def test_scores_are_fp32_under_bf16_autocast():
    """The trunk and head run in bf16, the normalisation and the prototypes in fp32: a bf16 score would be off by up
    to 2^-9, which Sinkhorn's exp(s / eps) multiplies by 1 / eps."""
    model = make_model(seed=11)
    with torch.no_grad():
        model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))
    conv_dtypes = []
    model.conv1.register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        z, scores = model(make_crops([16, 8], bs=3, seed=12))
    assert conv_dtypes == [torch.bfloat16] * 2  # autocast was on for the trunk
    assert z.dtype == scores.dtype == torch.float32
    exact = z @ model.prototypes.weight.t()
    torch.testing.assert_close(scores, exact, rtol=0, atol=1e-6)
    assert not torch.equal(scores, exact.bfloat16().float())  # not bf16 values in fp32 storage

def test_normalize_prototypes_in_place():
    model = make_model(seed=10)
    w = model.prototypes.weight
    with torch.no_grad():
        w.mul_(torch.linspace(0.1, 5.0, K)[:, None])
    before = w.detach().clone()
    ptr = w.data_ptr()
    model.normalize_prototypes()
    assert model.prototypes.weight is w and w.data_ptr() == ptr and w.requires_grad and w.grad is None
    torch.testing.assert_close(w.norm(dim=1), torch.ones(K), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.detach(), before / before.norm(dim=1, keepdim=True))
    model.normalize_prototypes()  # idempotent
    torch.testing.assert_close(w.detach(), before / before.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("arch, n_features", [("resnet18", 512), ("resnet50", 2048)])
def test_state_dict_layout_and_torchvision_trunk(arch, n_features):
    model = SwAVModel(arch, hidden_mlp=64, feat_dim=FEAT, n_prototypes=K)
    assert model.num_features == n_features
    sd = model.state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer4.0.conv1.weight", "projection_head.0.weight",
                "projection_head.1.running_var", "projection_head.3.weight", "prototypes.weight"):
        assert key in sd, key
    assert "prototypes.bias" not in sd
    assert not any(k.startswith("fc.") for k in sd)
    assert sd["projection_head.0.weight"].shape == (64, n_features)
    assert sd["prototypes.weight"].shape == (K, FEAT)
    trunk = trunk_state_dict(sd)
    assert not any(k.startswith(("projection_head", "prototypes")) for k in trunk)
    tv = getattr(torchvision.models, arch)()
    missing, unexpected = tv.load_state_dict(trunk, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    assert unexpected == []
    assert set(trunk) == set(tv.state_dict()) - {"fc.weight", "fc.bias"}
    # Official checkpoints are DDP-wrapped: the `module.` prefix is stripped.
    wrapped = trunk_state_dict({f"module.{k}": v for k, v in sd.items()})
    assert wrapped.keys() == trunk.keys()
    assert all(torch.equal(wrapped[k], trunk[k]) for k in trunk)


def test_torchvision_trunk_gives_the_same_features():
    model = make_model(seed=11).eval()
    tv = torchvision_trunk(model).eval()
    x = make_crops([32], bs=2, seed=12)[0]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_trunk(x), tv(x), rtol=1e-5, atol=1e-6)


def test_no_zero_init_of_residual_batchnorm():
    model = make_model(seed=13)
    assert torch.equal(model.layer1[0].bn2.weight, torch.ones(64))
    assert torch.equal(model.layer4[1].bn2.weight, torch.ones(512))


def test_hidden_mlp_zero_gives_linear_head():
    model = make_model(seed=14, hidden=0)
    assert isinstance(model.projection_head, nn.Linear)
    assert model.projection_head.weight.shape == (FEAT, 512)
    assert {k for k in model.state_dict() if k.startswith("projection_head")} == {
        "projection_head.weight", "projection_head.bias"}
    model.train()
    crops = make_crops([16, 8], bs=2, seed=15)
    z, scores = model(crops)
    with torch.no_grad():
        tv = torchvision_trunk(model)
        feats = torch.cat([tv(c) for c in crops])
        x = feats @ model.projection_head.weight.t() + model.projection_head.bias
        z_ref = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(z.detach(), z_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores.detach(), z_ref @ model.prototypes.weight.t(), rtol=1e-4, atol=1e-5)


def test_gradients_reach_trunk_head_and_prototypes():
    model = make_model(seed=16).train()
    z, scores = model(make_crops([16, 16, 8], bs=2, seed=17))
    (scores.sum() + z.pow(3).sum()).backward()
    for name in ("conv1.weight", "layer4.1.conv2.weight", "projection_head.0.weight", "prototypes.weight"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
