"""Tests for tools/linear_eval.py: the schedule, top-k, trunk inputs, the two training paths, errors, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_digits

from swav_fast.checkpoint import FORMAT
from swav_fast.model import SwAVModel
from tools.knn_eval import image_folder
from tools.linear_eval import (
    compute_features,
    cosine_lr,
    linear_eval,
    load_eval_trunk,
    main,
    topk_correct,
    train_transform,
)


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    """50 other digit images (5 per class), disjoint from digits_dir's."""
    return write_digits(tmp_path_factory.mktemp("digits_val"), per_class=5, offset=10)


def test_cosine_lr_per_epoch_values():
    assert cosine_lr(0, 100) == pytest.approx(0.3)
    assert cosine_lr(50, 100) == pytest.approx(0.15)
    assert cosine_lr(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(99, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi * 0.99)))
    values = [cosine_lr(e, 10, 1.0, 0.1) for e in range(11)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    # the same values as the official CosineAnnealingLR(epochs) stepped once per epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 7, eta_min=0.0)
    for epoch in range(7):
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(epoch, 7))
        opt.step()
        sched.step()


def test_topk_correct():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],
                           [0.1, 0.9, 0.5, 0.4, 0.3, 0.2],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    targets = torch.tensor([0, 2, 0])
    assert topk_correct(logits, targets) == [1, 2]  # row 2 has its target 6th: outside the top 5
    # fewer classes than k: every target is within the "top 5"
    assert topk_correct(torch.eye(4, 3), torch.tensor([0, 1, 2, 1])) == [3, 4]


def test_train_transform_is_random_crop_and_flip():
    names = [type(t).__name__ for t in train_transform(32).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train_transform(32).transforms[0].size == (32, 32)
    assert train_transform(32).transforms[-1].std == (0.228, 0.224, 0.225)


def test_precompute_accuracy_well_above_chance(digits_dir, val_dir):
    trunk, arch, kind = load_eval_trunk(None, "resnet18")
    assert (arch, kind) == ("resnet18", "random init")
    seen = []
    result = linear_eval(trunk, digits_dir, val_dir, size=32, epochs=30, precompute=True, eval_every=10,
                         on_epoch=seen.append)
    assert result["top1"] > 50  # chance is 10%; random-ResNet features of digits separate well
    assert 100 >= result["top5"] >= result["top1"]
    assert result["best_top1"] >= result["top1"]
    assert (result["n_train"], result["n_val"], result["n_classes"], result["num_features"]) == (100, 50, 10, 512)
    history = result["history"]
    assert seen == history and len(history) == 30
    assert [h["lr"] for h in history] == pytest.approx([cosine_lr(e, 30) for e in range(30)])
    assert history[0]["lr"] == pytest.approx(0.3) and history[-1]["lr"] < 0.001
    assert [h["epoch"] for h in history if "val_top1" in h] == [10, 20, 30]
    assert history[-1]["train_top1"] > 50


def test_faithful_path_keeps_trunk_frozen(digits_dir, val_dir):
    trunk, _, _ = load_eval_trunk(None, "resnet18")
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    result = linear_eval(trunk, digits_dir, val_dir, size=32, epochs=2, batch_size=32)
    assert len(result["history"]) == 2 and all("val_top1" in h for h in result["history"])
    assert result["top5"] >= result["top1"]
    # eval mode and no grad: weights and BatchNorm running statistics are untouched
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not trunk.training


def test_trunk_inputs_all_give_the_same_trunk(tmp_path, digits_dir):
    torch.manual_seed(5)
    swav = SwAVModel("resnet18", hidden_mlp=32, feat_dim=8, n_prototypes=6)
    torch.save({"format": FORMAT, "model": swav.state_dict(), "epoch": 1}, tmp_path / "checkpoint.pth")
    official = {f"module.{k}": v for k, v in swav.state_dict().items()}
    torch.save({"state_dict": official}, tmp_path / "swav_pretrain.pth.tar")
    trunk_only = {k: v for k, v in swav.state_dict().items() if not k.startswith(("projection_head", "prototypes"))}
    torch.save(trunk_only, tmp_path / "trunk_resnet18.pth")

    loader = torch.utils.data.DataLoader(image_folder(digits_dir, 32), batch_size=50)
    feats = {}
    for name, expected_kind in (("checkpoint.pth", "swav_fast"), ("swav_pretrain.pth.tar", "official"),
                                ("trunk_resnet18.pth", "torchvision")):
        trunk, arch, kind = load_eval_trunk(tmp_path / name)  # arch read from the file
        assert (arch, kind) == ("resnet18", expected_kind)
        feats[name] = compute_features(trunk, loader, torch.device("cpu"))[0]
    assert torch.equal(feats["checkpoint.pth"], feats["swav_pretrain.pth.tar"])
    assert torch.equal(feats["checkpoint.pth"], feats["trunk_resnet18.pth"])
    assert feats["checkpoint.pth"].shape == (100, 512)
    assert feats["checkpoint.pth"].norm(dim=1).std() > 0  # raw features, not L2-normalised

    with pytest.raises(ValueError, match="holds a resnet18 trunk but --arch is resnet50"):
        load_eval_trunk(tmp_path / "checkpoint.pth", "resnet50")


def test_bad_inputs_are_clear_errors(tmp_path, digits_dir, val_dir, capsys):
    trunk = tmp_path / "trunk.pth"
    torch.save(load_eval_trunk(None, "resnet18")[0].state_dict(), trunk)
    base = ["--train", str(digits_dir), "--val", str(val_dir), "--size", "32", "--epochs", "1", "--workers", "0"]
    cases = [
        (["--trunk", str(tmp_path / "missing.pth")] + base, "missing.pth: no such file"),
        (["--trunk", str(trunk), "--train", str(tmp_path / "nope")] + base[2:], "--train"),
        (["--trunk", str(trunk), "--train", str(tmp_path / "train.beton")] + base[2:], "not supported yet"),
        (["--trunk", str(trunk)] + base[:2] + ["--val", str(tmp_path / "v.beton")] + base[4:], ".beton"),
    ]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    cases.append((["--trunk", str(junk)] + base, "junk.pth cannot be read"))
    other = tmp_path / "other_classes"
    (other / "a").mkdir(parents=True)
    (other / "a" / "x.jpg").write_bytes((next(digits_dir.glob("0/*.jpg"))).read_bytes())
    cases.append((["--trunk", str(trunk), "--train", str(digits_dir), "--val", str(other)] + base[4:],
                  "different class folders"))
    for argv, needle in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("linear_eval: error:") and needle in err, (needle, err)
    with pytest.raises(SystemExit):
        main(["--random-init"] + base)  # --random-init needs --arch
    assert "--random-init needs --arch" in capsys.readouterr().err


def test_cli_end_to_end_json(tmp_path, digits_dir, val_dir, capsys):
    out = tmp_path / "res" / "linear.json"
    argv = ["--random-init", "--arch", "resnet18", "--train", str(digits_dir), "--val", str(val_dir), "--size", "32",
            "--epochs", "5", "--precompute", "--eval-every", "2", "--workers", "0", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "epoch   5/5" in text and "linear eval top-1" in text and "val top-1" in text
    data = json.loads(out.read_text())
    assert data["settings"]["lr_schedule"] == "cosine, stepped per epoch" and data["settings"]["precompute"]
    assert [h["epoch"] for h in data["history"] if "val_top1" in h] == [2, 4, 5]
    assert data["top5"] >= data["top1"] > 10
