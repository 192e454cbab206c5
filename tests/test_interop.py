"""Tests for swav_fast/interop.py: official-layout checkpoints (bare and {"state_dict"}) in and out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from swav_fast import interop
from swav_fast.checkpoint import FORMAT
from swav_fast.interop import (
    InteropError,
    infer_config,
    load_into_swav_model,
    official_to_torchvision,
    read_checkpoint,
    read_official,
)
from swav_fast.model import SwAVModel

HIDDEN, FEAT, K = 64, 16, 12


def make_model(seed: int = 0, **kwargs) -> SwAVModel:
    torch.manual_seed(seed)
    model = SwAVModel("resnet18", **{"hidden_mlp": HIDDEN, "feat_dim": FEAT, "n_prototypes": K, **kwargs})
    # Non-trivial BN statistics and buffers, so a round trip that dropped buffers would be noticed.
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.copy_(torch.rand_like(buf) + 0.5)
            else:
                buf.fill_(7)
    return model


def official_state(model: SwAVModel) -> dict[str, torch.Tensor]:
    """The DDP layout the official main_swav.py saves: every key prefixed by ``module.``."""
    return {f"module.{k}": v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def source() -> SwAVModel:
    return make_model(seed=1)


@pytest.fixture(scope="module", params=["bare", "wrapped"])
def official_file(request, tmp_path_factory, source) -> Path:
    path = tmp_path_factory.mktemp("official") / f"swav_{request.param}_pretrain.pth.tar"
    state = official_state(source)
    if request.param == "wrapped":  # a training checkpoint: epoch, state_dict, optimizer, amp
        state = {"epoch": 3, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}, "amp": {}}
    torch.save(state, path)
    return path


def test_read_official_round_trip_every_tensor(official_file, source):
    state = read_official(official_file)
    expected = source.state_dict()
    assert set(state) == set(expected)
    assert not any(k.startswith("module.") for k in state)
    for k, v in expected.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def test_load_into_swav_model_copies_everything(official_file, source):
    target = make_model(seed=2)
    assert not torch.equal(target.conv1.weight, source.conv1.weight)
    report = load_into_swav_model(read_official(official_file), target)
    assert report.missing == [] and report.unexpected == [] and report.skipped == []
    assert len(report.loaded) == len(source.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    # the module. prefix is accepted directly as well
    other = make_model(seed=3)
    load_into_swav_model(official_state(source), other)
    assert torch.equal(other.prototypes.weight, source.prototypes.weight)


def test_read_checkpoint_kinds(tmp_path, official_file, source):
    assert read_checkpoint(official_file)[1] == "official"
    ours = tmp_path / "checkpoint.pth"
    # a swav_fast checkpoint also holds numpy RNG state: readable without trusting arbitrary pickles
    torch.save({"format": FORMAT, "model": source.state_dict(), "rng": {"numpy": np.random.get_state()}}, ours)
    state, kind = read_checkpoint(ours)
    assert kind == "swav_fast" and torch.equal(state["prototypes.weight"], source.prototypes.weight)
    trunk = tmp_path / "trunk.pth"
    official_to_torchvision(official_file, trunk)
    assert read_checkpoint(trunk)[1] == "torchvision"


def test_export_loads_into_torchvision_with_only_fc_missing(tmp_path, official_file, source):
    out = tmp_path / "sub" / "trunk_resnet18.pth"
    cfg = official_to_torchvision(official_file, out)
    assert cfg["arch"] == "resnet18"
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    for k, v in tv.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, source.state_dict()[k]), k


def test_infer_config(official_file):
    cfg = infer_config(read_official(official_file))
    assert cfg == {"arch": "resnet18", "num_features": 512, "hidden_mlp": HIDDEN, "feat_dim": FEAT,
                   "nmb_prototypes": K}


def test_infer_config_other_layouts():
    linear_head = make_model(hidden_mlp=0).state_dict()
    assert infer_config(linear_head)["hidden_mlp"] == 0 and infer_config(linear_head)["feat_dim"] == FEAT
    no_protos = {k: v for k, v in make_model().state_dict().items() if not k.startswith("prototypes.")}
    assert infer_config(no_protos)["nmb_prototypes"] is None
    # resnet50 recognised from its bottleneck layout (built on the meta device: no memory, no time)
    with torch.device("meta"):
        r50 = torchvision.models.resnet50().state_dict()
    cfg = infer_config({k: v for k, v in r50.items() if not k.startswith("fc.")})
    assert cfg["arch"] == "resnet50" and cfg["num_features"] == 2048 and cfg["hidden_mlp"] is None


def test_infer_config_official_widened_resnet_is_named():
    with torch.device("meta"):
        wide = torchvision.models.resnet50().state_dict()
    # the official resnet50w2 widens the stem as well: no torchvision architecture has conv1 with 128 filters
    wide["conv1.weight"] = torch.empty(128, 3, 7, 7, device="meta")
    with pytest.raises(InteropError, match="resnet50w2"):
        infer_config(wide)


def test_eval_only_export_without_prototypes(tmp_path, source):
    path = tmp_path / "eval_only.pth.tar"
    torch.save({k: v for k, v in official_state(source).items() if "prototypes" not in k}, path)
    state = read_official(path)
    target = make_model(seed=4)
    with pytest.raises(InteropError, match="prototypes.weight"):
        load_into_swav_model(state, target)
    report = load_into_swav_model(state, target, strict_head=False)
    assert report.missing == ["prototypes.weight"]
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    official_to_torchvision(path, tmp_path / "trunk.pth")  # the trunk exports all the same


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, official_file):
    target = make_model(n_prototypes=K + 5)
    with pytest.raises(InteropError) as err:
        load_into_swav_model(read_official(official_file), target, source=official_file)
    msg = str(err.value)
    assert str(official_file) in msg and "prototypes.weight" in msg
    assert f"({K}, {FEAT})" in msg and f"({K + 5}, {FEAT})" in msg
    # without strict_head, another K is skipped (and reported) rather than an error
    report = load_into_swav_model(read_official(official_file), target, strict_head=False)
    assert report.skipped == ["prototypes.weight"]


def test_trunk_mismatch_is_an_error_even_without_strict_head(tmp_path, source):
    state = official_state(source)
    state["module.layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    with pytest.raises(InteropError, match=r"layer1\.0\.conv1\.weight has shape \(32, 64, 3, 3\)"):
        load_into_swav_model(state, make_model(), strict_head=False)
    torch.save(state, tmp_path / "bad.pth.tar")
    with pytest.raises(InteropError, match="matches no torchvision architecture"):
        official_to_torchvision(tmp_path / "bad.pth.tar", tmp_path / "out.pth")


def test_wrong_architecture_is_named(source):
    with torch.device("meta"):
        r50 = SwAVModel("resnet50", hidden_mlp=HIDDEN, feat_dim=FEAT, n_prototypes=K)
    with pytest.raises(InteropError, match="shape mismatch|resnet50"):
        load_into_swav_model(source.state_dict(), r50)


def test_multi_prototypes_unsupported(tmp_path, source):
    state = official_state(source)
    weight = state.pop("module.prototypes.weight")
    state["module.prototypes.prototypes0.weight"] = weight
    state["module.prototypes.prototypes1.weight"] = weight[:5].clone()
    path = tmp_path / "multi.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(InteropError, match="MultiPrototypes") as err:
        read_official(path)
    assert str(path) in str(err.value) and "prototypes.prototypes0.weight" in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(InteropError, match="does not exist"):
        read_official(tmp_path / "nope.pth.tar")
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(InteropError, match=str(junk)):
        read_official(junk)
    listy = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(InteropError, match="not a state_dict"):
        read_official(listy)


class Opaque:  # an arbitrary pickled object: refused unless trusted
    pass


def test_arbitrary_pickles_need_trust(tmp_path, source):
    path = tmp_path / "pickled.pth.tar"
    torch.save({"state_dict": official_state(source), "args": Opaque()}, path)
    with pytest.raises(InteropError, match="--trust-pickle"):
        read_official(path)
    assert "conv1.weight" in read_official(path, trust_pickle=True)


def test_cli_info_and_export(tmp_path, official_file, capsys):
    assert interop.main(["info", str(official_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "resnet18" and info["kind"] == "official" and info["nmb_prototypes"] == K
    assert interop.main(["info", str(official_file)]) == 0
    assert "resnet18" in capsys.readouterr().out
    out = tmp_path / "trunk.pth"
    assert interop.main(["export", str(official_file), str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out


def test_cli_export_refuses_an_existing_output_without_force(tmp_path, official_file, capsys):
    out = tmp_path / "trunk.pth"
    out.write_bytes(b"precious")
    assert interop.main(["export", str(official_file), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"interop: error: output {out} already exists; it was left untouched (pass --force to overwrite it)\n"
    assert out.read_bytes() == b"precious"
    assert interop.main(["export", str(official_file), str(out), "--force"]) == 0
    assert "wrote" in capsys.readouterr().out
    result = torchvision.models.resnet18().load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    # never the file being read, --force or not; nor a directory
    before = official_file.read_bytes()
    assert interop.main(["export", str(official_file), str(official_file), "--force"]) == 2
    assert "is the checkpoint being read" in capsys.readouterr().err and official_file.read_bytes() == before
    assert interop.main(["export", str(official_file), str(tmp_path)]) == 2
    assert f"output {tmp_path} is a directory" in capsys.readouterr().err


def test_cli_error_is_one_line_naming_the_file(tmp_path, capsys):
    assert interop.main(["export", str(tmp_path / "missing.pth.tar"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("interop: error:") and "missing.pth.tar" in err
    assert not (tmp_path / "o.pth").exists()


def test_cli_export_under_a_file_is_a_clear_error(tmp_path, official_file, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_bytes(b"x")
    out = blocker / "trunk.pth"
    assert interop.main(["export", str(official_file), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"interop: error: cannot write {out}") and "Traceback" not in err
    assert blocker.read_bytes() == b"x"
