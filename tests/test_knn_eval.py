"""Tests for tools/knn_eval.py: the kNN vote on hand-built cases, few-label banks, trunk loading, features,
.beton input (tools/write_ffcv.py files) giving the figures of the ImageFolder it was written from."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import needs_ffcv
from PIL import Image

from tools import knn_eval
from tools.knn_eval import (
    eval_transform,
    extract_features,
    few_label_bank,
    few_label_knn,
    knn_predict,
    load_trunk,
    main,
)
from tools.write_ffcv import sidecar_paths, write_beton


def unit(*degrees: float) -> torch.Tensor:
    """2-D unit vectors at the given angles: cosine similarity between them is cos(angle difference)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


# Three tight clusters: class 0 around 0 degrees, class 1 around 90, class 2 around 180.
CLUSTER_FEATS = unit(-3, 0, 3, 87, 90, 93, 177, 180, 183)
CLUSTER_LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_knn_clusters_hand_built():
    queries = unit(5, 80, 100, 170, 200, -10)
    preds = knn_predict(CLUSTER_FEATS, CLUSTER_LABELS, queries, k=3)
    assert preds.tolist() == [0, 1, 1, 2, 2, 0]
    assert preds.dtype == torch.int64


def test_knn_weighting_beats_plain_majority():
    # Query at 0 degrees: one class-0 neighbour at similarity 1.0, two class-1 neighbours at cos(40) = 0.77.
    # Weighted (T=0.07): exp(1/0.07) is 28x exp(0.77/0.07), so the single close neighbour outvotes the pair.
    # With a huge temperature every weight is ~1 and the vote is a plain majority: class 1.
    bank = unit(0, 40, -40)
    labels = torch.tensor([0, 1, 1])
    query = unit(0)
    assert knn_predict(bank, labels, query, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(bank, labels, query, k=3, temperature=100.0).tolist() == [1]
    # k=1 is plain nearest neighbour.
    assert knn_predict(bank, labels, unit(35), k=1).tolist() == [1]


def test_knn_small_temperature_does_not_overflow():
    # exp(1/0.005) overflows float32; without care both classes get an infinite vote and argmax picks class 0.
    bank = unit(0, 25)
    labels = torch.tensor([1, 0])
    assert knn_predict(bank, labels, unit(2), k=2, temperature=0.005).tolist() == [1]


def test_knn_k_clipped_to_bank_and_chunking():
    queries = unit(5, 80, 100, 170, 200, -10)
    expected = knn_predict(CLUSTER_FEATS, CLUSTER_LABELS, queries, k=len(CLUSTER_FEATS))
    assert knn_predict(CLUSTER_FEATS, CLUSTER_LABELS, queries, k=1000).tolist() == expected.tolist()
    # A three-point bank with k=50: all three vote, the weights still decide.
    assert knn_predict(unit(0, 40, -40), torch.tensor([0, 1, 1]), unit(0), k=50).tolist() == [0]

    gen = torch.Generator().manual_seed(0)
    bank, query = torch.randn(200, 16, generator=gen), torch.randn(50, 16, generator=gen)
    bank_labels = torch.randint(0, 5, (200,), generator=gen)
    whole = knn_predict(bank, bank_labels, query, k=7, chunk=1024)
    assert knn_predict(bank, bank_labels, query, k=7, chunk=3).tolist() == whole.tolist()


def test_knn_uses_cosine_not_dot_product():
    # Class 0 points straight at the query but is short; class 1 is 60 degrees off but long. By cosine the
    # answer is class 0; a raw dot product (0.1 vs 5.0) would say class 1.
    bank = torch.cat([0.1 * unit(0), 10.0 * unit(60)])
    assert knn_predict(bank, torch.tensor([0, 1]), 3.0 * unit(0), k=2).tolist() == [0]
    scaled = CLUSTER_FEATS * torch.linspace(0.1, 10, len(CLUSTER_FEATS))[:, None]
    assert knn_predict(scaled, CLUSTER_LABELS, unit(5, 80, 170), k=3).tolist() == [0, 1, 2]


def test_knn_bank_copied_to_its_device_is_normalised_there_alone():
    # a bank converted on its way (another dtype here, another device on a GPU) is normalised in place in the
    # copy: the same votes as the caller's fp32 bank, and the caller's tensors are left as they were
    gen = torch.Generator().manual_seed(1)
    bank, query = 3.0 * torch.randn(300, 16, generator=gen), torch.randn(40, 16, generator=gen)
    labels = torch.randint(0, 6, (300,), generator=gen)
    wide = bank.double()
    before = (bank.clone(), wide.clone())
    expected = knn_predict(bank, labels, query, k=9)
    assert knn_predict(wide, labels, query, k=9, device="cpu").tolist() == expected.tolist()
    assert knn_predict(bank, labels, query, k=9, device="cpu").tolist() == expected.tolist()
    assert torch.equal(bank, before[0]) and torch.equal(wide, before[1])


def _gpu_that_fits(monkeypatch, largest_chunk: int) -> list[tuple[str, int]]:
    """knn_predict as on a GPU whose memory holds the similarities of at most ``largest_chunk`` queries (none: 0),
    run on the CPU; returns the (device, chunk) of each call."""
    real, calls = knn_predict, []  # the module's own, not a stand-in set before

    def fake(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        device, chunk = str(bound.arguments["device"]), bound.arguments["chunk"]
        calls.append((device, chunk))
        if device != "cpu" and chunk > largest_chunk:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.20 GiB")
        bound.arguments["device"] = "cpu"
        return real(*bound.args, **bound.kwargs)

    monkeypatch.setattr(knn_eval, "knn_predict", fake)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return calls


def test_knn_out_of_gpu_memory_takes_smaller_blocks_then_the_cpu(monkeypatch, capsys):
    queries = unit(5, 80, 170)
    calls = _gpu_that_fits(monkeypatch, 256)
    assert knn_eval.bank_knn(CLUSTER_FEATS, CLUSTER_LABELS, queries, 3, 0.07, 3, "cuda").tolist() == [0, 1, 2]
    assert calls == [("cuda", 1024), ("cuda", 256)] and capsys.readouterr().err == ""

    calls = _gpu_that_fits(monkeypatch, 0)
    assert knn_eval.bank_knn(CLUSTER_FEATS, CLUSTER_LABELS, queries, 3, 0.07, 3, "cuda").tolist() == [0, 1, 2]
    assert calls == [("cuda", 1024), ("cuda", 256), ("cuda", 64), ("cpu", 1024)]
    err = capsys.readouterr().err
    assert "knn_eval: note: the kNN does not fit in cuda's memory (the bank of 9 features is 0.0 GiB in fp32" in err
    assert "it runs on the CPU" in err

    calls = _gpu_that_fits(monkeypatch, 0)
    knn_eval.bank_knn(CLUSTER_FEATS, CLUSTER_LABELS, queries, 3, 0.07, 3, "cpu")
    assert calls == [("cpu", 1024)]  # on the CPU from the start: one pass, no note
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by tools/gpu_suite.sh)")
def test_knn_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    bank, query = torch.randn(5000, 64, generator=gen), torch.randn(700, 64, generator=gen)
    labels = torch.randint(0, 10, (5000,), generator=gen)
    on_gpu = knn_predict(bank, labels, query, k=20, device="cuda", chunk=256)
    assert on_gpu.device.type == "cpu"
    # a near-tie in the similarities may rank neighbours differently in another summation order: at most 1%
    assert (on_gpu == knn_predict(bank, labels, query, k=20)).float().mean() >= 0.99
    assert knn_predict(bank.cuda(), labels, query, k=20).tolist() == on_gpu.tolist()  # a bank already there


def test_knn_rejects_empty_bank():
    with pytest.raises(ValueError, match="empty"):
        knn_predict(torch.empty(0, 2), torch.empty(0, dtype=torch.long), unit(0))


def test_few_label_bank_exactly_per_class():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 20 + [3] * 5)
    bank = few_label_bank(labels, per_class=5, rng=np.random.default_rng(0))
    assert len(bank) == len(set(bank.tolist())) == 20
    assert np.bincount(labels[bank]).tolist() == [5, 5, 5, 5]

    again = few_label_bank(labels, per_class=5, rng=np.random.default_rng(0))
    other = few_label_bank(labels, per_class=5, rng=np.random.default_rng(1))
    assert again.tolist() == bank.tolist()
    assert other.tolist() != bank.tolist()

    with pytest.raises(ValueError, match="class 3 has only 5"):
        few_label_bank(labels, per_class=6, rng=np.random.default_rng(0))


def _noisy_clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 8, generator=gen)
    labels = torch.arange(4).repeat_interleave(n_per_class)
    feats = centers[labels] + 0.9 * torch.randn(len(labels), 8, generator=gen)
    return F.normalize(feats, dim=1), labels


def test_few_label_knn_deterministic_and_matches_manual_draws():
    train_feats, train_labels = _noisy_clusters(30, seed=0)
    test_feats, test_labels = _noisy_clusters(25, seed=1)
    args = (train_feats, train_labels, test_feats, test_labels)

    first = few_label_knn(*args, per_class=3, draws=4, k=5, seed=7)
    assert few_label_knn(*args, per_class=3, draws=4, k=5, seed=7) == first

    # Same figures by hand: successive banks from one seeded generator, accuracy on the whole test set.
    rng = np.random.default_rng(7)
    accs = []
    for _ in range(4):
        bank = torch.from_numpy(few_label_bank(train_labels.numpy(), 3, rng))
        preds = knn_predict(train_feats[bank], train_labels[bank], test_feats, k=5)
        accs.append(100.0 * (preds == test_labels).float().mean().item())
    assert first[0] == pytest.approx(np.mean(accs))
    assert first[1] == pytest.approx(np.std(accs, ddof=1))
    assert first[1] > 0  # noisy clusters: the draws really differ

    assert few_label_knn(*args, per_class=3, draws=1, k=5)[1] == 0.0


def test_few_label_knn_separable_is_perfect():
    queries = unit(5, 80, 100, 170, 200, -10)
    query_labels = torch.tensor([0, 1, 1, 2, 2, 0])
    assert few_label_knn(CLUSTER_FEATS, CLUSTER_LABELS, queries, query_labels, per_class=1, draws=3) == (
        100.0,
        0.0,
    )


def test_load_trunk_state_dict_without_fc(tmp_path: Path):
    torch.manual_seed(123)
    source = torchvision.models.resnet18()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "trunk_resnet18.pth"
    torch.save(state, path)

    model = load_trunk(str(path), "resnet18")
    assert isinstance(model.fc, torch.nn.Identity)
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_load_trunk_with_fc_and_random_init_seeded(tmp_path: Path):
    path = tmp_path / "full.pth"
    torch.save(
        torchvision.models.resnet18(num_classes=10).state_dict(), path
    )  # a head of another size is fine
    load_trunk(str(path), "resnet18")

    a, b = load_trunk(None, "resnet18", seed=0), load_trunk(None, "resnet18", seed=0)
    c = load_trunk(None, "resnet18", seed=1)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_load_trunk_wrong_keys_raise_naming_the_file(tmp_path: Path):
    state = torchvision.models.resnet18().state_dict()
    state["layer9.weight"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "x.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_trunk(str(path), "resnet18")
    message = str(info.value)
    assert str(path) in message
    assert "missing layer1.0.conv1.weight" in message
    assert "unexpected layer9.weight" in message

    checkpoint = tmp_path / "ckpt.pth"
    torch.save({"model": torchvision.models.resnet18().state_dict(), "epoch": 3}, checkpoint)
    with pytest.raises(ValueError, match="ckpt.pth"):
        load_trunk(str(checkpoint), "resnet18")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_trunk(str(tmp_path / "nope.pth"), "resnet18")


def make_folder(root: Path, counts: dict[str, int], seed: int = 0, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return root


def test_extract_features_normalised_rows_and_labels(tmp_path: Path):
    folder = make_folder(tmp_path / "imgs", {"a": 3, "b": 2})
    model = load_trunk(None, "resnet18")
    feats, labels = extract_features(model, folder, size=32, batch_size=2)

    assert feats.dtype == torch.float32 and feats.shape == (5, 512)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 0, 1, 1]
    assert torch.allclose(feats.norm(dim=1), torch.ones(5), atol=1e-5)

    # The first row is the model's output for the first file under the evaluation transform.
    transform = eval_transform(32)
    with torch.no_grad():
        expected = model(transform(Image.open(folder / "a" / "0.jpg").convert("RGB"))[None])
    assert torch.allclose(feats[0], F.normalize(expected, dim=1)[0], atol=1e-5)


def test_eval_transform_is_the_standard_centre_crop():
    transform = eval_transform(32)
    steps = [type(t).__name__ for t in transform.transforms]
    assert steps == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert transform.transforms[0].size == 37  # round(32 * 256 / 224): the shorter side
    assert tuple(transform.transforms[3].mean) == (0.485, 0.456, 0.406)
    assert tuple(transform.transforms[3].std) == (0.228, 0.224, 0.225)

    # A 60x40 image, black but for a white left edge: resized to 55x37 and centre-cropped to 32x32, only
    # columns 12+ survive, so the crop is uniformly black; without the crop the left edge would be white.
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :8] = 255
    out = transform(Image.fromarray(image))
    assert out.shape == (3, 32, 32)
    black = (0 - 0.485) / 0.228
    assert torch.allclose(out[0], torch.full((32, 32), black), atol=1e-4)


def test_extract_features_missing_or_empty_folder(tmp_path: Path):
    model = load_trunk(None, "resnet18")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        extract_features(model, tmp_path / "does_not_exist", size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        extract_features(model, tmp_path / "empty", size=32)


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    train = make_folder(tmp_path / "train", {"a": 4, "b": 4}, seed=0)
    val = make_folder(tmp_path / "val", {"a": 2, "b": 2}, seed=1)
    trunk = tmp_path / "trunk_resnet18.pth"
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if k[:3] != "fc."}, trunk)
    out = tmp_path / "knn.json"

    argv = ["--trunk", str(trunk), "--arch", "resnet18", "--train", str(train), "--val", str(val)]
    argv += ["--size", "32", "--few-labels", "2", "--draws", "3", "--baseline", str(trunk)]
    argv += ["--compare-random-init", "--json", str(out)]
    assert main(argv) == 0

    printed = capsys.readouterr().out
    for name in ("trained", "baseline", "random init"):
        assert f"kNN top-1 {name}: " in printed
    assert "2-label: " in printed
    figures = json.loads(out.read_text())
    assert set(figures["results"]) == {"trained", "baseline", "random init"}
    assert figures["results"]["trained"] == figures["results"]["baseline"]  # same file, same figures
    assert figures["settings"]["n_train"] == 8 and figures["settings"]["n_val"] == 4
    assert 0.0 <= figures["results"]["random init"]["top1"] <= 100.0


def test_cli_takes_a_run_checkpoint_and_reads_the_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A run's checkpoint as train.py writes it (numpy and Python RNG states included) gives the figures of the
    trunk exported from it; the architecture is read from the file, and a wrong --arch is an error naming both."""
    from swav_fast.checkpoint import FORMAT, export_trunk, rng_state, save_checkpoint
    from swav_fast.model import SwAVModel

    train = make_folder(tmp_path / "train", {"a": 4, "b": 4}, seed=0)
    val = make_folder(tmp_path / "val", {"a": 2, "b": 2}, seed=1)
    torch.manual_seed(3)
    swav = SwAVModel("resnet18", hidden_mlp=32, feat_dim=8, n_prototypes=6)
    ckpt = save_checkpoint({"format": FORMAT, "epoch": 0, "iteration": 2, "model": swav.state_dict(),
                            "rng": [rng_state()]},
                           tmp_path / "run", keep=1)
    trunk = tmp_path / "run" / "trunk_resnet18.pth"
    export_trunk(swav.state_dict(), trunk)
    out = tmp_path / "knn.json"

    argv = ["--trunk", str(ckpt), "--baseline", str(trunk), "--train", str(train), "--val", str(val)]
    argv += ["--size", "32", "--few-labels", "0", "--json", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    figures = json.loads(out.read_text())
    assert figures["settings"]["arch"] == "resnet18"
    assert figures["results"]["trained"]["top1"] == figures["results"]["baseline"]["top1"]
    assert "kNN on resnet18 features" in capsys.readouterr().out

    assert main(argv + ["--arch", "resnet50"]) == 2
    assert "holds a resnet18 trunk but --arch is resnet50" in capsys.readouterr().err
    # a --baseline is named as such: missing, or of another architecture than --trunk
    argv[argv.index("--baseline") + 1] = str(tmp_path / "nope.pth")
    assert main(argv) == 2
    assert f"--baseline {tmp_path / 'nope.pth'}: no such file" in capsys.readouterr().err
    torch.save({k: v for k, v in torchvision.models.resnet34().state_dict().items() if k[:3] != "fc."},
               tmp_path / "r34.pth")
    argv[argv.index("--baseline") + 1] = str(tmp_path / "r34.pth")
    assert main(argv) == 2
    assert f"--baseline {tmp_path / 'r34.pth'} holds a resnet34 trunk but --trunk a resnet18" in capsys.readouterr().err


def test_cli_too_many_few_labels_names_the_option_before_any_feature(tmp_path: Path, monkeypatch,
                                                                      capsys: pytest.CaptureFixture[str]):
    train = make_folder(tmp_path / "train", {"a": 4, "b": 3}, seed=0)
    val = make_folder(tmp_path / "val", {"a": 1, "b": 1}, seed=1)

    def no_features(*args, **kwargs):
        raise AssertionError("features computed before --few-labels was checked")

    monkeypatch.setattr(knn_eval, "extract_features", no_features)
    trunk = tmp_path / "trunk_resnet18.pth"
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if k[:3] != "fc."}, trunk)
    argv = ["--trunk", str(trunk), "--train", str(train), "--val", str(val), "--size", "32", "--few-labels", "500"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"knn_eval: error: --few-labels 500: class 'b' of --train {train} has only 3 images; pass "
                   "--few-labels 3 or less (0 skips the few-label evaluation)\n"), err
    assert "per_class" not in err


def test_cli_bad_trunk_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    train = make_folder(tmp_path / "train", {"a": 1})
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    assert main(["--trunk", str(bad), "--train", str(train), "--val", str(train), "--size", "32"]) == 2
    assert str(bad) in capsys.readouterr().err


@needs_ffcv
def test_beton_input_gives_the_folder_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    train = make_folder(tmp_path / "train", {"a": 4, "b": 4, "c": 3}, seed=0)
    val = make_folder(tmp_path / "val", {"a": 2, "b": 2, "c": 2}, seed=1)
    train_beton, val_beton = tmp_path / "train.beton", tmp_path / "val.beton"
    write_beton(train, train_beton, workers=1, progress=False)
    write_beton(val, val_beton, workers=1, progress=False)
    model = load_trunk(None, "resnet18")
    feats, labels = extract_features(model, train, size=32, batch_size=4)
    beton_feats, beton_labels = extract_features(model, train_beton, size=32, batch_size=4)
    assert torch.equal(beton_feats, feats) and beton_labels.tolist() == labels.tolist() == [0] * 4 + [1] * 4 + [2] * 3

    trunk = tmp_path / "trunk_resnet18.pth"
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if k[:3] != "fc."}, trunk)
    figures = {}
    for name, tr, va in (("folders", train, val), ("betons", train_beton, val_beton), ("mixed", train, val_beton)):
        out = tmp_path / f"{name}.json"
        argv = ["--trunk", str(trunk), "--train", str(tr), "--val", str(va), "--size", "32", "--k", "3",
                "--few-labels", "2", "--draws", "2", "--json", str(out)]
        assert main(argv) == 0
        assert "kNN top-1 trained: " in capsys.readouterr().out
        data = json.loads(out.read_text())
        figures[name] = (data["results"]["trained"]["top1"], data["results"]["trained"]["few_label_mean"],
                         data["settings"]["n_train"], data["settings"]["n_val"], data["settings"]["n_classes"])
    assert figures["betons"] == figures["folders"] == figures["mixed"]
    assert figures["folders"][2:] == (11, 6, 3)
    # --few-labels above the smallest class: named as the option, class named from the sidecar
    assert main(["--trunk", str(trunk), "--train", str(train_beton), "--val", str(val), "--size", "32",
                 "--few-labels", "4"]) == 2
    assert f"--few-labels 4: class 'c' of --train {train_beton} has only 3 images" in capsys.readouterr().err

    # without its sidecar a .beton still works, its classes counted from the labels, with a note
    bare = tmp_path / "bare.beton"
    shutil.copy(train_beton, bare)
    assert not sidecar_paths(bare)[0].exists()
    assert main(["--trunk", str(trunk), "--train", str(bare), "--val", str(val), "--size", "32", "--k", "3",
                 "--few-labels", "0"]) == 0
    captured = capsys.readouterr()
    assert "knn_eval: note: --train: " in captured.err and "no sidecar bare.beton.json" in captured.err
    assert f"kNN top-1 trained: {figures['folders'][0]:.2f}%" in captured.out

    # a missing or foreign .beton: one error line naming the file and tools/write_ffcv.py
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\x00" * 100)
    for bad, needle in ((tmp_path / "missing.beton", "no such .beton file"), (junk, "is not an FFCV .beton file")):
        assert main(["--trunk", str(trunk), "--train", str(train), "--val", str(bad), "--size", "32"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"knn_eval: error: --val {bad}") or err.startswith(f"knn_eval: error: --val '{bad}'")
        assert needle in err and "tools/write_ffcv.py" in err and err.count("\n") == 1, err


def test_two_ranks_share_the_feature_passes_and_give_one_process_figures(tmp_path: Path, capsys):
    # torchrun: each rank computes the features of its share of the images (here 101 and 49: shares of unequal
    # length), rank 0 receives them in order and gives the figures of one process, printed once
    from conftest import run_torchrun, write_digits

    train, val = write_digits(tmp_path / "train", per_class=11), write_digits(tmp_path / "val", per_class=5, offset=11)
    next((train / "3").iterdir()).rename(tmp_path / "moved.jpg")  # 109 images
    next((val / "7").iterdir()).unlink()  # 49
    trunk = tmp_path / "trunk_resnet18.pth"
    torch.manual_seed(0)
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if k[:3] != "fc."}, trunk)
    argv = ["--trunk", str(trunk), "--train", str(train), "--val", str(val), "--size", "32", "--few-labels", "3",
            "--draws", "4", "--compare-random-init", "--batch-size", "16", "--workers", "1"]
    proc = run_torchrun(["tools/knn_eval.py", *argv, "--json", str(tmp_path / "two.json")], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("kNN top-1 trained: ") == 1 and proc.stdout.count("wrote ") == 1, proc.stdout
    assert main([*argv, "--json", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["settings"].pop("world_size") == 2 and one["settings"].pop("world_size") == 1
    assert two["settings"] == one["settings"] and one["settings"]["n_train"] == 109
    for name, row in one["results"].items():
        assert two["results"][name]["top1"] == pytest.approx(row["top1"], abs=2.1)  # one image of 49
        assert two["results"][name]["few_label_mean"] == pytest.approx(row["few_label_mean"], abs=2.1)


def test_gather_shares_puts_every_row_in_its_place(monkeypatch):
    # the arithmetic of gather_shares without processes: dist.gather stood in for by the other ranks' blocks
    n, world, dim = 11, 3, 2
    full = torch.arange(n * dim, dtype=torch.float32).view(n, dim)
    shares = [full[r::world] for r in range(world)]
    calls = []

    def fake_gather(block, blocks, dst, group):
        start = len(calls) * 2  # rows_per_call 2 below
        calls.append(len(block))
        for r, out in enumerate(blocks):
            got = shares[r][start:start + len(block)]
            out.zero_()[:len(got)] = got

    monkeypatch.setattr(knn_eval.dist, "gather", fake_gather)
    from swav_fast.distributed import DistInfo

    info = DistInfo(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"))
    assert torch.equal(knn_eval.gather_shares(shares[0], n, info, rows_per_call=2), full)
    assert calls == [2, 2]  # rank 0's 4 rows, in blocks of 2


def test_a_gpu_index_under_torchrun_is_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        main(["--trunk", "t.pth", "--train", str(tmp_path), "--val", str(tmp_path), "--device", "cuda:1"])
    assert exc.value.code == 2
    assert "--device cuda:1: under torchrun each rank takes the GPU of its LOCAL_RANK" in capsys.readouterr().err


def test_dist_timeout_reaches_the_process_group(monkeypatch, capsys, digits_dir, joins_asked):
    argv = ["--trunk", "none", "--arch", "resnet18", "--train", str(digits_dir), "--val", str(digits_dir),
            "--few-labels", "0", "--device", "cpu"]
    trunk = knn_eval.load_eval_trunk(None, "resnet18")[0]
    monkeypatch.setattr(knn_eval, "load_eval_trunk", lambda *a, **k: (trunk, "resnet18", "probe"))
    assert main(argv + ["--dist-timeout", "45"]) == 2
    assert main(argv) == 2
    assert joins_asked == [("cpu", 45.0), ("cpu", 0.0)]
    assert "probe: no group joined" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--dist-timeout", "-1"])
    assert "--dist-timeout: '-1': give a number of minutes >= 0" in capsys.readouterr().err


def test_cli_lists_each_folder_once_for_every_trunk(tmp_path: Path, monkeypatch, capsys):
    # --few-labels and two trunks used to list the train folder three times and the val folder twice
    train = make_folder(tmp_path / "train", {"a": 4, "b": 3}, seed=0)
    val = make_folder(tmp_path / "val", {"a": 2, "b": 2}, seed=1)
    listed = []
    real = knn_eval.eval_dataset

    def counted(path, *args, **kwargs):
        listed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(knn_eval, "eval_dataset", counted)
    trunk = tmp_path / "trunk_resnet18.pth"
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if k[:3] != "fc."}, trunk)
    argv = ["--trunk", str(trunk), "--train", str(train), "--val", str(val), "--size", "32", "--few-labels", "2",
            "--draws", "2", "--k", "3", "--compare-random-init", "--json", str(tmp_path / "knn.json")]
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(listed) == ["train", "val"]
    rows = json.loads((tmp_path / "knn.json").read_text())
    assert len(rows["results"]) == 2, rows
