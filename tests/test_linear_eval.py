"""Tests for tools/linear_eval.py: the schedule, top-k, trunk inputs, the two training paths, errors, the CLI,
and .beton input (tools/write_ffcv.py files) giving what the ImageFolder it was written from gives."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import needs_ffcv, write_digits

from swav_fast.checkpoint import FORMAT
from swav_fast.distributed import DistInfo
from swav_fast.model import SwAVModel
from tools.knn_eval import eval_dataset, image_folder
from tools.linear_eval import (
    compute_features,
    cosine_lr,
    linear_eval,
    load_eval_trunk,
    main,
    topk_correct,
    train_transform,
)
from tools.write_ffcv import BetonImages, read_beton_bytes, sidecar_paths, write_beton


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    """50 other digit images (5 per class), disjoint from digits_dir's."""
    return write_digits(tmp_path_factory.mktemp("digits_val"), per_class=5, offset=10)


@pytest.fixture(scope="module")
def betons(tmp_path_factory, digits_dir, val_dir) -> tuple[Path, Path]:
    """digits_dir and val_dir written to .beton files (every image kept byte for byte: small baseline JPEGs)."""
    out = tmp_path_factory.mktemp("betons")
    train, val = out / "train.beton", out / "val.beton"
    for src, dst in ((digits_dir, train), (val_dir, val)):
        meta = write_beton(src, dst, workers=1, progress=False)
        assert meta["counts"]["kept_original"] == meta["counts"]["written"]
    return train, val


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
    from tools.linear_eval import _frozen_features

    # the trunk's forward keeps no autograd graph (its activations would stay alive through the head's step)
    assert not _frozen_features(trunk, torch.zeros(2, 3, 32, 32)).requires_grad


def test_checkpoint_resumes_to_the_same_result(tmp_path, digits_dir, val_dir, capsys):
    # the faithful path (random crops and flips drawn in this process): stopped after 2 of 4 epochs, then resumed
    def trunk():
        return load_eval_trunk(None, "resnet18")[0]

    kw = {"size": 32, "epochs": 4, "batch_size": 32, "eval_every": 2}
    whole = linear_eval(trunk(), digits_dir, val_dir, **kw)

    def stop_after_two(entry):
        if entry["epoch"] == 2:
            raise KeyboardInterrupt

    ck = tmp_path / "sub" / "linear.pth"
    with pytest.raises(KeyboardInterrupt):
        linear_eval(trunk(), digits_dir, val_dir, **kw, on_epoch=stop_after_two, checkpoint=ck)
    seen = []
    resumed = linear_eval(trunk(), digits_dir, val_dir, **kw, on_epoch=seen.append, checkpoint=ck)
    assert resumed.pop("resumed_from_epoch") == 2 and "resumed from" in capsys.readouterr().err
    assert resumed == whole and seen == whole["history"]  # bit-equal on CPU, every epoch reported once
    # a finished checkpoint gives its figures without training; another evaluation's is refused, untouched
    assert {k: v for k, v in linear_eval(trunk(), digits_dir, val_dir, **kw, checkpoint=ck).items()
            if k != "resumed_from_epoch"} == whole
    before = ck.read_bytes()
    with pytest.raises(ValueError, match=r"written by another evaluation \(lr 0.3 -> 0.1\)"):
        linear_eval(trunk(), digits_dir, val_dir, **kw, lr=0.1, checkpoint=ck)
    other = trunk()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match=r"another evaluation \(trunk_checksum "):
        linear_eval(other, digits_dir, val_dir, **kw, checkpoint=ck)
    assert ck.read_bytes() == before
    ck.write_bytes(b"not a checkpoint")
    assert main(["--random-init", "--arch", "resnet18", "--train", str(digits_dir), "--val", str(val_dir), "--size",
                 "32", "--epochs", "4", "--workers", "0", "--checkpoint", str(ck)]) == 2
    assert f"linear_eval: error: --checkpoint {ck} cannot be read" in capsys.readouterr().err


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
        (["--trunk", str(trunk), "--train", str(tmp_path / "train.beton")] + base[2:],
         "--train " + str(tmp_path / "train.beton") + ": no such .beton file; write one from an ImageFolder with"),
        (["--trunk", str(trunk)] + base[:2] + ["--val", str(tmp_path / "v.beton")] + base[4:],
         "--val " + str(tmp_path / "v.beton") + ": no such .beton file"),
    ]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    cases.append((["--trunk", str(junk)] + base, "junk.pth cannot be read"))
    other = tmp_path / "other_classes"
    (other / "a").mkdir(parents=True)
    (other / "a" / "x.jpg").write_bytes((next(digits_dir.glob("0/*.jpg"))).read_bytes())
    cases.append((["--trunk", str(trunk), "--train", str(digits_dir), "--val", str(other)] + base[4:],
                  "have different classes (10: 0, 1, 2, 3, 4, ... vs 1: a;"))
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("linear_eval: error:") and needle in err, (needle, err)
    with pytest.raises(SystemExit):
        main(["--random-init"] + base)  # --random-init needs --arch
    assert "--random-init needs --arch" in capsys.readouterr().err


@pytest.mark.parametrize("options, needle", [
    (["--lr", "-1"], "--lr -1.0: must be a finite number > 0"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--final-lr", "-0.1"], "--final-lr -0.1: must be a finite number >= 0"),
    (["--lr", "0.01", "--final-lr", "0.3"], "--final-lr 0.3 is above --lr 0.01: the cosine would raise the learning "
                                           "rate; were the two swapped?"),
    (["--momentum", "-0.9"], "--momentum -0.9: must be a finite number >= 0"),
    (["--wd", "inf"], "--wd inf: must be a finite number >= 0"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs --momentum above 0"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch-size", "-4"], "--batch-size -4: must be at least 1"),
    (["--eval-every", "0"], "--eval-every 0: must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be 0 or more"),
])
def test_bad_numbers_fail_before_any_work(tmp_path, monkeypatch, capsys, options, needle):
    """A wrong number is a one-line usage error (exit 2) naming the option, before any trunk or image is read."""
    import tools.linear_eval as linear_eval_module

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    for name in ("check_classes", "load_eval_trunk", "linear_eval"):
        monkeypatch.setattr(linear_eval_module, name, no_work)
    with pytest.raises(SystemExit) as exc:
        main(["--random-init", "--arch", "resnet18", "--train", str(tmp_path), "--val", str(tmp_path), *options])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: {needle}\n"), err


def test_linear_eval_checks_its_numbers_before_reading_data(tmp_path):
    trunk = load_eval_trunk(None, "resnet18")[0]
    for kwargs, needle in (({"lr": -1.0}, "lr=-1.0"), ({"lr": 0.0}, "lr=0.0 must be a finite number > 0"),
                           ({"wd": float("nan")}, "wd=nan"), ({"lr": 0.1, "final_lr": 0.2}, "final_lr=0.2 is above"),
                           ({"momentum": 0.0, "nesterov": True}, "nesterov")):
        with pytest.raises(ValueError, match=needle):  # not torch's, after the features: the data does not exist
            linear_eval(trunk, tmp_path / "missing", tmp_path / "missing", **kwargs)


def test_help_is_self_contained(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "REFERENCE" not in text and "official SwAV eval_linear.py" in text


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


@needs_ffcv
def test_beton_dataset_gives_the_image_folder_samples(digits_dir, betons):
    train_beton, _ = betons
    folder = torchvision.datasets.ImageFolder(str(digits_dir))  # PIL images, no transform
    data = BetonImages(train_beton)
    assert len(data) == len(folder) == 100
    assert data.classes == folder.classes and data.num_classes == 10 and data.note is None
    assert data.targets.tolist() == folder.targets
    for i, (path, label) in enumerate(folder.samples):
        assert data.read_bytes(i) == Path(path).read_bytes()  # the original file, byte for byte
        image, got_label = data[i]
        want, _ = folder[i]
        assert got_label == label and isinstance(got_label, int)
        assert image.mode == "RGB" and image.size == want.size
        assert np.array_equal(np.asarray(image), np.asarray(want)), path
    # the same bytes as ffcv's own Loader reads (so ptr is an absolute file offset)
    assert [(data.read_bytes(i), int(data.targets[i]), i) for i in range(len(data))] == list(
        read_beton_bytes(train_beton, batch_size=32))

    # with the evaluation transform, through DataLoader workers (each maps the file itself): the same tensors
    beton_set, folder_set = eval_dataset(train_beton, 32, "--train"), eval_dataset(digits_dir, 32, "--train")
    assert isinstance(beton_set, BetonImages) and isinstance(folder_set, torchvision.datasets.ImageFolder)
    beton_batches = list(torch.utils.data.DataLoader(beton_set, batch_size=40, num_workers=2))
    folder_batches = list(torch.utils.data.DataLoader(folder_set, batch_size=40))
    assert len(beton_batches) == len(folder_batches) == 3
    for (xb, yb), (xf, yf) in zip(beton_batches, folder_batches, strict=True):
        assert torch.equal(xb, xf) and torch.equal(yb, yf)
    assert beton_set._map is None  # only the workers mapped the file
    # pickling (spawned workers) carries the metadata, never the mapped file
    assert torch.equal(beton_set[0][0], folder_set[0][0]) and beton_set._map is not None
    copy = pickle.loads(pickle.dumps(beton_set))
    assert copy._map is None and len(pickle.dumps(beton_set)) < 20_000
    assert torch.equal(copy[7][0], folder_set[7][0])


@needs_ffcv
def test_linear_eval_on_beton_equals_image_folder(digits_dir, val_dir, betons):
    train_beton, val_beton = betons
    trunk, _, _ = load_eval_trunk(None, "resnet18")
    # the faithful path: random crops and flips from the same seeded generators on the same pixels
    kw = dict(size=32, epochs=2, batch_size=32, seed=4)
    folders = linear_eval(trunk, digits_dir, val_dir, **kw)
    both = linear_eval(trunk, train_beton, val_beton, **kw)
    mixed = linear_eval(trunk, train_beton, val_dir, **kw)
    assert folders["history"][0]["train_loss"] > 0 and len(folders["history"]) == 2
    assert both == folders  # every figure and the whole history, exactly
    assert mixed == folders
    # the precomputed path as well, and the other mix
    kw.update(precompute=True, epochs=3)
    assert linear_eval(trunk, digits_dir, val_beton, **kw) == linear_eval(trunk, digits_dir, val_dir, **kw)


@needs_ffcv
def test_cli_on_beton(tmp_path, digits_dir, val_dir, betons, capsys):
    train_beton, val_beton = betons
    base = ["--random-init", "--arch", "resnet18", "--size", "32", "--epochs", "3", "--precompute", "--workers", "0"]
    results = {}
    for name, train, val in (("folders", digits_dir, val_dir), ("betons", train_beton, val_beton)):
        out = tmp_path / f"{name}.json"
        assert main(base + ["--train", str(train), "--val", str(val), "--json", str(out)]) == 0
        assert "linear eval top-1" in capsys.readouterr().out
        data = json.loads(out.read_text())
        assert data["settings"]["train"] == str(train)
        results[name] = {k: v for k, v in data.items() if k != "settings"}
    assert results["betons"] == results["folders"]
    assert results["betons"]["n_train"] == 100 and results["betons"]["n_classes"] == 10


def _write_other_fields(path: Path) -> None:
    """An FFCV .beton that is not a write_ffcv file: image and label, but no index field."""
    from ffcv.fields import BytesField, IntField
    from ffcv.writer import DatasetWriter

    samples = [(np.frombuffer(b"not a jpeg", dtype=np.uint8), 0)] * 3
    DatasetWriter(str(path), {"image": BytesField(), "label": IntField()}, num_workers=1).from_indexed_dataset(
        samples)


@needs_ffcv
def test_bad_beton_files_are_one_line_errors(tmp_path, digits_dir, val_dir, betons, capsys):
    train_beton, val_beton = betons
    trunk = tmp_path / "trunk.pth"
    torch.save(load_eval_trunk(None, "resnet18")[0].state_dict(), trunk)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"these are not the samples you are looking for\n" * 20)
    empty = tmp_path / "empty.beton"
    empty.write_bytes(b"")
    other = tmp_path / "other.beton"
    _write_other_fields(other)
    capsys.readouterr()  # ffcv's progress bar
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(train_beton.read_bytes()[:(1 << 23) + 50_000])  # cut inside the first page of data
    stale = tmp_path / "stale.beton"  # the train file with the val file's sidecar (50 samples)
    shutil.copy(train_beton, stale)
    shutil.copy(sidecar_paths(val_beton)[0], sidecar_paths(stale)[0])
    cases = [
        (junk, "is not an FFCV .beton file"),
        (empty, "is not an FFCV .beton file"),
        (other, "is an FFCV .beton but not one written by tools/write_ffcv.py: its fields are image (BytesField), "
                "label (IntField), expected image (BytesField), label (IntField), index (IntField)"),
        (truncated, "is truncated"),
        (stale, "does not describe"),
    ]
    for bad, needle in cases:
        for option in ("--train", "--val"):
            data = {"--train": digits_dir, "--val": val_dir, option: bad}
            argv = ["--trunk", str(trunk), "--train", str(data["--train"]), "--val", str(data["--val"]),
                    "--size", "32", "--epochs", "1", "--workers", "0"]
            assert main(argv) == 2, (bad, option)
            err = capsys.readouterr().err
            assert err.startswith(f"linear_eval: error: {option} ") and needle in err, (bad, option, err)
            assert str(bad) in err and "tools/write_ffcv.py" in err, err
            assert err.count("\n") == 1, err  # one line
    # the file's own errors, without the tools around it
    with pytest.raises(ValueError, match="truncated"):
        BetonImages(truncated)
    with pytest.raises(FileNotFoundError, match="no such .beton file"):
        BetonImages(tmp_path / "missing.beton")
    with pytest.raises(FileNotFoundError, match="no such .beton file"):
        list(read_beton_bytes(tmp_path / "missing.beton"))
    with pytest.raises(ValueError, match="not one written by tools/write_ffcv.py"):
        list(read_beton_bytes(other))


@needs_ffcv
def test_beton_without_sidecar_and_class_mismatch(tmp_path, digits_dir, val_dir, betons, capsys):
    train_beton, val_beton = betons
    bare = tmp_path / "bare.beton"
    shutil.copy(train_beton, bare)
    data = BetonImages(bare)
    assert data.classes is None and data.num_classes == 10
    assert "no sidecar bare.beton.json" in data.note and "10 classes taken from the largest label + 1" in data.note

    trunk, _, _ = load_eval_trunk(None, "resnet18")
    kw = dict(size=32, epochs=2, precompute=True, seed=2)
    messages = []
    from rich.console import Console
    console = Console(file=_Lines(messages), width=400)
    result = linear_eval(trunk, bare, val_beton, console=console, **kw)
    assert result == linear_eval(trunk, train_beton, val_beton, **kw)
    assert any("note: --train: " in m and "no sidecar bare.beton.json" in m for m in messages), messages

    # a folder with fewer classes than the .beton's labels, and named classes that differ
    few = tmp_path / "few"
    for c in ("0", "1"):
        shutil.copytree(val_dir / c, few / c)
    with pytest.raises(ValueError, match="--train has labels up to 9 but --val .*few has only 2 classes"):
        linear_eval(trunk, bare, few, **kw)
    with pytest.raises(ValueError, match="have different classes"):
        linear_eval(trunk, train_beton, few, **kw)


class _Lines:
    """A file-like object collecting what a rich Console writes."""

    def __init__(self, into: list[str]):
        self.into = into

    def write(self, text: str) -> int:
        self.into.append(text)
        return len(text)

    def flush(self) -> None:
        pass


# --- several ranks (torchrun): each rank takes its share of every batch and of the validation images ---

_RANK_DRIVER = '''
import json, os, sys
from tools import knn_eval, linear_eval as le
from swav_fast.distributed import exit_process, init_distributed, shutdown

spec = json.loads(sys.argv[1])
stop_after = spec.pop("stop_after")
info = init_distributed("cpu") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
elsewhere = spec.pop("checkpoint_of_rank_1", None)
if elsewhere and info.rank == 1:  # a node of its own, which does not see rank 0's file
    spec["checkpoint"] = elsewhere


def on_epoch(entry):
    if entry["epoch"] == stop_after:  # every rank stops there, after the epoch's checkpoint
        raise KeyboardInterrupt


try:
    result = le.linear_eval(knn_eval.load_eval_trunk(None, "resnet18")[0], spec.pop("train"), spec.pop("val"),
                            dist_info=info, on_epoch=on_epoch, **spec)
except KeyboardInterrupt:
    result = "stopped"
if info is None or info.is_main:
    print("RESULT " + json.dumps(result))
shutdown()
exit_process(0)
'''


def _run_ranks(tmp_path: Path, **spec) -> dict | str:
    """linear_eval on 2 gloo ranks (workers 0, CPU) through _RANK_DRIVER; rank 0's result ("stopped" when stopped
    by spec's stop_after)."""
    from conftest import run_torchrun

    driver = tmp_path / "rank_driver.py"
    driver.write_text(_RANK_DRIVER)
    spec = {"size": 32, "batch_size": 32, "workers": 0, "stop_after": None, **spec}
    spec = {k: str(v) if isinstance(v, Path) else v for k, v in spec.items()}
    proc = run_torchrun([str(driver), json.dumps(spec)], 300, {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    return json.loads(lines[0][len("RESULT "):])


def test_two_ranks_train_the_classifier_of_one_process(tmp_path, digits_dir, val_dir):
    # 100 training images on 2 ranks of 16 per batch: the batches of 32 of one process, each image with the same
    # random crop and flip (drawn from its own seed, in a worker process or not), so the same gradients, averaged
    # over the ranks, and the same classifier up to float rounding
    kw = {"size": 32, "epochs": 3, "batch_size": 32, "eval_every": 1}
    two = _run_ranks(tmp_path, train=digits_dir, val=val_dir, checkpoint=tmp_path / "two.pth", workers=1, **kw)
    one = linear_eval(load_eval_trunk(None, "resnet18")[0], digits_dir, val_dir, checkpoint=tmp_path / "one.pth",
                      **kw)
    assert (two["n_train"], two["n_val"], two["n_classes"]) == (one["n_train"], one["n_val"], one["n_classes"])
    assert len(two["history"]) == len(one["history"]) == 3
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["lr"] == b["lr"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_top1"] == pytest.approx(b["train_top1"], abs=1.0)  # one image of 100 (an argmax tie)
        assert a["val_top1"] == pytest.approx(b["val_top1"], abs=2.0)  # one image of 50, counted over both shares
    heads = [torch.load(tmp_path / f"{name}.pth", weights_only=True)["head"] for name in ("two", "one")]
    for key in heads[1]:
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-4, atol=2e-5)  # weights ~1e-2
    assert not torch.equal(heads[1]["weight"], torch.zeros_like(heads[1]["weight"]))


def test_two_ranks_resume_to_the_same_classifier(tmp_path, digits_dir, val_dir):
    # stopped after 1 of 3 epochs and resumed, with other worker counts each time: bit-equal
    kw = {"train": digits_dir, "val": val_dir, "epochs": 3, "eval_every": 2}
    whole = _run_ranks(tmp_path, checkpoint=tmp_path / "whole.pth", workers=2, **kw)
    ck = tmp_path / "ranks.pth"
    assert _run_ranks(tmp_path, checkpoint=ck, stop_after=1, workers=1, **kw) == "stopped"
    assert len(torch.load(ck, weights_only=True)["history"]) == 1
    # rank 0 alone reads the file (it alone writes it): here rank 1 is given a path where there is none
    resumed = _run_ranks(tmp_path, checkpoint=ck, checkpoint_of_rank_1=tmp_path / "node1" / "none.pth", **kw)
    assert resumed.pop("resumed_from_epoch") == 1
    assert resumed == whole
    saved = [torch.load(p, weights_only=True) for p in (tmp_path / "whole.pth", ck)]
    for key in saved[0]["head"]:
        assert torch.equal(saved[0]["head"][key], saved[1]["head"][key]), key
    assert saved[1]["identity"]["world_size"] == 2
    # one process does not continue the ranks' evaluation (its images come in other batches)
    with pytest.raises(ValueError, match=r"another evaluation \(world_size 2 -> 1\)"):
        linear_eval(load_eval_trunk(None, "resnet18")[0], digits_dir, val_dir, size=32, batch_size=32, epochs=3,
                    eval_every=2, checkpoint=ck)


def test_seeded_views_are_a_function_of_seed_epoch_and_image(digits_dir):
    from tools.linear_eval import EpochSampler, SeededViews

    views = SeededViews(eval_dataset(digits_dir, 32, "--train"), seed=7)
    views.dataset.transform = train_transform(32)
    before = torch.get_rng_state()
    first = views[(0, 5)][0]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is untouched
    torch.manual_seed(123)
    views[(0, 9)]
    assert torch.equal(views[(0, 5)][0], first)  # whatever was drawn before, by whom
    assert not torch.equal(views[(1, 5)][0], first)  # another epoch, another crop
    assert not torch.equal(SeededViews(views.dataset, seed=8)[(0, 5)][0], first)
    sampler = torch.utils.data.DistributedSampler(views, num_replicas=2, rank=1, shuffle=True, seed=7)
    sampler.set_epoch(4)
    keys = list(EpochSampler(sampler))
    assert len(keys) == len(sampler) == 50 and [i for _, i in keys] == list(sampler) and {e for e, _ in keys} == {4}


def test_cli_on_two_ranks(tmp_path, digits_dir, val_dir):
    # the command itself under torchrun: rank 0 alone prints and writes; the same command continues the file
    from conftest import run_torchrun

    cmd = ["tools/linear_eval.py", "--random-init", "--arch", "resnet18", "--train", str(digits_dir), "--val",
           str(val_dir), "--size", "32", "--epochs", "2", "--batch-size", "32", "--workers", "1", "--lr", "0.01",
           "--checkpoint", str(tmp_path / "linear.pth"), "--json", str(tmp_path / "linear.json")]
    runs = [run_torchrun(cmd, 300) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count("linear eval top-1 ") == 1 and proc.stdout.count("epoch   2/2") == 1, proc.stdout
        assert "device cpu on 2 ranks" in proc.stdout
    assert runs[1].stderr.count("resumed from ") == 1 and "2 of 2 epochs done" in runs[1].stderr
    saved = json.loads((tmp_path / "linear.json").read_text())
    assert saved["settings"]["world_size"] == 2 and saved["n_train"] == 100 and len(saved["history"]) == 2
    assert saved["resumed_from_epoch"] == 2


def test_ranks_options_checked_before_any_work(monkeypatch, capsys, digits_dir, val_dir):
    from tools.linear_eval import _parse_args

    monkeypatch.setenv("WORLD_SIZE", "4")
    base = ["--random-init", "--arch", "resnet18", "--train", str(digits_dir), "--val", str(val_dir)]
    for extra, needle in ((["--precompute"], "--precompute runs in one process, not on 4 ranks"),
                          (["--batch-size", "30"], "--batch-size 30 is the total over the 4 ranks and must be a "
                                                   "multiple of it: pass for example 28"),
                          (["--device", "cuda:1"], "--device cuda:1: under torchrun each rank takes the GPU of its "
                                                   "LOCAL_RANK")):
        with pytest.raises(SystemExit) as exc:
            _parse_args(base + extra)
        assert exc.value.code == 2 and needle in capsys.readouterr().err, extra
    assert _parse_args(base + ["--batch-size", "32", "--device", "cpu"]).batch_size == 32
    trunk = load_eval_trunk(None, "resnet18")[0]
    info = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="must be a multiple of it"):  # the function checks it too
        linear_eval(trunk, digits_dir, val_dir, size=32, batch_size=30, dist_info=info)


def test_checkpoint_of_an_older_linear_eval_is_named(tmp_path, digits_dir, val_dir):
    ck = tmp_path / "old.pth"
    torch.save({"format": "swav_fast linear_eval/1", "identity": {}, "history": []}, ck)
    with pytest.raises(ValueError, match=r"written by an older linear_eval, which visited the images in another "
                                         r"order; delete it to start over"):
        linear_eval(load_eval_trunk(None, "resnet18")[0], digits_dir, val_dir, size=32, epochs=1, checkpoint=ck)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by tools/gpu_suite.sh)")
@pytest.mark.parametrize("precompute", [False, True], ids=["faithful", "precompute"])
def test_linear_eval_on_cuda_matches_cpu(digits_dir, val_dir, monkeypatch, precompute):
    # pinned batches, the device-side sums and the device-side top-k counts on a GPU give the CPU's figures;
    # --precompute's features held on the GPU and gathered there in the CPU's order as well
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, as on the CPU
    kw = {"size": 32, "epochs": 2, "batch_size": 32, "lr": 0.01, "workers": 2, "precompute": precompute}
    cpu = linear_eval(load_eval_trunk(None, "resnet18")[0], digits_dir, val_dir, device="cpu", **kw)
    gpu = linear_eval(load_eval_trunk(None, "resnet18")[0], digits_dir, val_dir, device="cuda", **kw)
    for a, b in zip(gpu["history"], cpu["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_top1"] == pytest.approx(b["val_top1"], abs=2.0)  # one image of 50
        assert a["val_top5"] == pytest.approx(b["val_top5"], abs=2.0)


def test_ctrl_c_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch, capsys, digits_dir, val_dir):
    import tools.linear_eval as linear_eval_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(linear_eval_module, "linear_eval", interrupted)
    base = ["--random-init", "--arch", "resnet18", "--train", str(digits_dir), "--val", str(val_dir)]
    ck = tmp_path / "linear.pth"
    assert main(base + ["--checkpoint", str(ck)]) == 130
    err = capsys.readouterr().err
    assert err == f"linear_eval: interrupted; {ck} holds the epochs done; the same command continues from it\n"
    assert main(base) == 130
    assert "pass --checkpoint FILE to make a long evaluation resumable" in capsys.readouterr().err


def test_dist_timeout_reaches_the_process_group(capsys, digits_dir, val_dir, joins_asked):
    from tools.linear_eval import main

    argv = ["--random-init", "--arch", "resnet18", "--train", str(digits_dir), "--val", str(val_dir),
            "--batch-size", "32", "--device", "cpu"]
    assert main(argv + ["--dist-timeout", "2.5"]) == 2
    assert joins_asked == [("cpu", 2.5)]
    assert "probe: no group joined" in capsys.readouterr().err


def test_precomputed_features_go_to_the_device_once_or_stay_on_the_host(monkeypatch):
    from tools.linear_eval import _on_device

    feats, labels = torch.randn(10, 4), torch.arange(10)
    assert _on_device(feats, labels, torch.device("cpu"))[0] is feats
    moved = _on_device(feats, labels, torch.device("meta"))  # stands in for a GPU
    assert [t.device.type for t in moved] == ["meta", "meta"]
    said = []

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.00 GiB")

    monkeypatch.setattr(torch.Tensor, "to", out_of_memory)
    kept = _on_device(feats, labels, torch.device("meta"), said.append)
    assert kept[0] is feats and kept[1] is labels
    assert len(said) == 1 and "do not fit on meta; they stay on the host" in said[0]
