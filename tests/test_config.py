"""Configuration (swav_fast.config): presets against REFERENCE section 7, errors, precedence, round trips."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swav_fast.config import (
    PRESET_DIR,
    Config,
    ConfigError,
    build_parser,
    load_toml,
    parse_config,
    preset_path,
    to_toml,
    trimmed_queue_length,
    validate,
)

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(PRESET_DIR.glob("*.toml"))
FIELD_NAMES = [f.name for f in dataclasses.fields(Config)]


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"bs256_200ep", "bs256_400ep", "bs4096_100ep", "bs4096_200ep", "bs4096_400ep",
            "bs4096_800ep"} <= names


def recipe_world_size(name: str) -> int:
    """The number of ranks a preset is written for (REFERENCE section 7): 4 for bs256, 64 for bs4096."""
    return {"bs256": 4, "bs4096": 64}.get(name.split("_")[0], 1)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_validates(path):
    world_size = recipe_world_size(path.stem)
    values = load_toml(path)
    cfg = validate(Config(**values), world_size)
    assert cfg.n_crops == sum(cfg.nmb_crops)
    # By name and by path give the same config.
    assert parse_config(["--preset", path.stem], world_size) == cfg
    assert parse_config(["--preset", str(path)], world_size) == cfg


COMMON = dict(nmb_crops=[2, 6], size_crops=[224, 96], min_scale_crops=[0.14, 0.05], max_scale_crops=[1.0, 0.14],
              crops_for_assign=[0, 1], temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, feat_dim=128,
              nmb_prototypes=3000, hidden_mlp=2048, wd=1e-6, arch="resnet50", batch_size=64, momentum=0.9,
              lars_trust=0.001)


@pytest.mark.parametrize("epochs", [200, 400])
def test_bs256_presets_are_the_official_recipe(epochs):
    cfg = parse_config(["--preset", f"bs256_{epochs}ep"], world_size=4)
    for k, v in COMMON.items():
        assert getattr(cfg, k) == v, k
    assert cfg.epochs == epochs
    assert cfg.base_lr == 0.6 and cfg.final_lr == 0.0006
    assert cfg.warmup_epochs == 0
    assert cfg.freeze_prototypes_niters == 5005
    assert cfg.queue_length == 3840 and cfg.epoch_queue_starts == 15
    assert trimmed_queue_length(cfg, 4) == 3840
    assert cfg.sync_bn and cfg.sync_bn_group_size == 0  # global SyncBN


@pytest.mark.parametrize("epochs", [100, 200, 400, 800])
def test_bs4096_presets_are_the_official_recipe(epochs):
    cfg = parse_config(["--preset", f"bs4096_{epochs}ep"], world_size=64)
    for k, v in COMMON.items():
        assert getattr(cfg, k) == v, k
    assert cfg.epochs == epochs
    assert cfg.base_lr == 4.8 and cfg.final_lr == 0.0048
    assert cfg.warmup_epochs == 10 and cfg.start_warmup == 0.3
    assert cfg.freeze_prototypes_niters == 313
    assert cfg.queue_length == 0
    assert cfg.sync_bn and cfg.sync_bn_group_size == 8


# ----------------------------------------------------------------------------- unknown names


@pytest.mark.parametrize("key, closest", [("base_lrr", "base_lr"), ("epsilonn", "epsilon"),
                                          ("nmb_prototype", "nmb_prototypes"), ("queue-length", "queue_length")])
def test_unknown_toml_key_names_closest(tmp_path, key, closest):
    f = tmp_path / "c.toml"
    f.write_text(f'"{key}" = 1\n' if "-" in key else f"{key} = 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")) as e:
        load_toml(f)
    assert f"'{closest}'" in str(e.value)
    with pytest.raises(ConfigError):
        parse_config(["--preset", str(f)])


@pytest.mark.parametrize("argv, closest", [(["--base_lrr", "1"], "--base_lr"), (["--base_lrr=1"], "--base_lr"),
                                           (["--epsilonn", "0.1"], "--epsilon"),
                                           (["--freeze_prototype_niters", "3"], "--freeze_prototypes_niters"),
                                           (["--base-lrr", "1"], "--base-lr"),  # the alias the user was typing
                                           (["--no-sync-bnn"], "--no-sync-bn"), (["--no-sync_bnn"], "--no-sync_bn")])
def test_unknown_flag_names_closest(capsys, argv, closest):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert argv[0].split("=")[0] in err
    assert f"(did you mean '{closest}'?)" in err  # the flag as it is typed, not the field name
    value = argv[0].partition("=")[2:] if "=" in argv[0] else argv[1:]
    parse_config([closest, *value])  # and the suggestion is a flag that parses


def test_official_command_lines_name_what_to_pass_instead(capsys):
    # the official bs256 script's launch flags: each unknown one with its replacement, no flag guessed by spelling
    argv = ["--dump_path", "/x", "--use_fp16", "true", "--sync_bn", "pytorch", "--syncbn_process_group_size", "8",
            "--dist_url", "env://", "--world_size", "4", "--rank", "0", "stray"]
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (
        "train.py: error: unrecognized arguments: --dump_path (main_swav.py's flag; here: --run_dir) /x --use_fp16 "
        "(main_swav.py's flag; here: --precision, bf16 autocast on CUDA by default) true pytorch (--sync_bn is a "
        "switch here, on by default: PyTorch's SyncBatchNorm) --syncbn_process_group_size (main_swav.py's flag; "
        "here: --sync_bn_group_size) 8 --dist_url (main_swav.py's flag; not needed: torchrun sets up the ranks) "
        "env:// --world_size (main_swav.py's flag; not needed: torchrun sets up the ranks) 4 --rank (main_swav.py's "
        "flag; not needed: torchrun sets up the ranks) 0 stray").replace("train.py", err.split(":")[0])
    # what the table points to parses; torch.distributed.launch's --local-rank (older: --local_rank) is accepted
    cfg = parse_config(["--run_dir", "/x", "--precision", "auto", "--sync_bn", "--sync_bn_group_size", "1",
                        "--checkpoint_freq", "25", "--local-rank=1"])
    assert (cfg.run_dir, cfg.sync_bn, cfg.sync_bn_group_size, cfg.checkpoint_freq) == ("/x", True, 1, 25)
    assert parse_config(["--local_rank", "0"]) == parse_config([])


def test_unknown_preset_names_closest():
    with pytest.raises(ConfigError, match="bs256_200ep"):
        parse_config(["--preset", "bs256_200"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--preset", "/nonexistent/x.toml"])


# ----------------------------------------------------------------------------- impossible values


@pytest.mark.parametrize("argv, world, option", [
    (["--queue_length", "100", "--batch_size", "64"], 2, "queue_length"),
    (["--queue_length", "255", "--batch_size", "64"], 4, "queue_length"),
    (["--crops_for_assign", "0", "8"], 1, "crops_for_assign"),
    (["--crops_for_assign", "0", "-1"], 1, "crops_for_assign"),
    (["--crops_for_assign", "1", "1"], 1, "crops_for_assign"),
    (["--size_crops", "224"], 1, "size_crops"),
    (["--nmb_crops", "2", "6", "2"], 1, "size_crops"),
    (["--min_scale_crops", "0.05", "0.05", "--max_scale_crops", "1.0"], 1, "max_scale_crops"),
    (["--min_scale_crops", "0.5", "0.05", "--max_scale_crops", "0.4", "0.14"], 1, "min_scale_crops"),
    (["--epsilon=-0.05"], 1, "epsilon"),
    (["--epsilon", "0"], 1, "epsilon"),
    (["--temperature=-1"], 1, "temperature"),
    (["--sinkhorn_iterations", "0"], 1, "sinkhorn_iterations"),
    (["--batch_size", "0"], 1, "batch_size"),
    (["--base_lr=-0.1"], 1, "base_lr"),
    (["--base_lr", "nan"], 1, "base_lr"),
    (["--base_lr", "0.0006", "--final_lr", "0.6"], 1, "final_lr"),  # swapped: the cosine would climb
    (["--preset", "bs256_200ep", "--base_lr", "0.0005"], 1, "final_lr"),  # under the preset's final_lr 0.0006
    (["--wd", "inf"], 1, "wd"),
    (["--dist_timeout_minutes", "inf"], 2, "dist_timeout_minutes"),
    (["--dist_timeout_minutes=-5"], 2, "dist_timeout_minutes"),
    (["--blur_prob", "1.5"], 1, "blur_prob"),
    (["--warmup_epochs", "11", "--epochs", "10"], 1, "warmup_epochs"),
    (["--freeze_prototypes_niters=-1"], 1, "freeze_prototypes_niters"),
    (["--sync_bn_group_size", "3"], 4, "sync_bn_group_size"),
    (["--stop_after_epoch", "20", "--epochs", "10", "--warmup_epochs", "0"], 1, "stop_after_epoch"),
    (["--nmb_crops", "1", "--size_crops", "224", "--min_scale_crops", "0.1", "--max_scale_crops", "1",
      "--crops_for_assign", "0"], 1, "nmb_crops"),
])
def test_impossible_values_fail_naming_the_option(argv, world, option):
    with pytest.raises(ConfigError, match=re.escape(f"--{option}")):
        parse_config(argv, world)


def test_constant_learning_rate_is_allowed():
    cfg = parse_config(["--base_lr", "0.1", "--final_lr", "0.1"])
    assert cfg.base_lr == cfg.final_lr == 0.1


def test_queue_equal_to_global_batch_is_allowed():
    cfg = parse_config(["--queue_length", "256", "--batch_size", "64"], world_size=4)
    assert trimmed_queue_length(cfg, 4) == 256


@pytest.mark.parametrize("text, option", [
    ('epochs = "ten"\n', "epochs"),
    ('base_lr = "0.6"\n', "base_lr"),
    ("sync_bn = 1\n", "sync_bn"),
    ("epochs = true\n", "epochs"),
    ("epochs = 2.5\n", "epochs"),
    ("nmb_crops = 2\n", "nmb_crops"),
    ('nmb_crops = [2, "6"]\n', "nmb_crops"),
    ("arch = 50\n", "arch"),
])
def test_wrong_type_in_toml(tmp_path, text, option):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"'{option}'")):
        load_toml(f)


def test_ints_accepted_for_floats_in_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("base_lr = 1\nmin_scale_crops = [0, 1]\n")
    values = load_toml(f)
    assert values == {"base_lr": 1.0, "min_scale_crops": [0.0, 1.0]}
    assert isinstance(values["base_lr"], float)


def test_invalid_toml_syntax(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("base_lr = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(f)


def test_bad_value_fails_before_any_work(tmp_path):
    # train.main validates before it creates the run directory or touches data.
    import train

    run_dir = tmp_path / "run"
    code = train.main(["--epsilon=-1", "--run_dir", str(run_dir), "--data_path", str(tmp_path / "nothing")])
    assert code == 2
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- precedence and spelling


def test_defaults_without_arguments():
    cfg = parse_config([])
    assert cfg == Config()


def test_cli_overrides_preset():
    cfg = parse_config(["--preset", "bs256_200ep", "--base_lr", "1.2", "--queue_length", "0", "--epochs", "7",
                        "--nmb_crops", "2", "4", "--size_crops", "160", "64", "--no-sync_bn"], world_size=4)
    assert cfg.base_lr == 1.2 and cfg.queue_length == 0 and cfg.epochs == 7
    assert cfg.nmb_crops == [2, 4] and cfg.size_crops == [160, 64]
    assert cfg.sync_bn is False
    assert cfg.final_lr == 0.0006 and cfg.freeze_prototypes_niters == 5005  # the rest from the preset


def test_hyphenated_alias():
    a = parse_config(["--base-lr", "0.9", "--nmb-prototypes", "77", "--freeze-prototypes-niters", "4",
                      "--no-channels-last"])
    b = parse_config(["--base_lr", "0.9", "--nmb_prototypes", "77", "--freeze_prototypes_niters", "4",
                      "--no-channels_last"])
    assert a == b
    assert a.base_lr == 0.9 and a.nmb_prototypes == 77 and a.freeze_prototypes_niters == 4
    assert a.channels_last is False


def test_flag_types_and_choices(capsys):
    cfg = parse_config(["--epochs", "3", "--warmup_epochs", "1", "--base_lr", "2", "--crops_for_assign", "1", "0",
                        "--arch", "resnet18"])
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.base_lr == 2.0 and isinstance(cfg.base_lr, float)
    assert cfg.crops_for_assign == [1, 0]
    with pytest.raises(SystemExit):
        parse_config(["--epochs", "3.5"])
    with pytest.raises(SystemExit):
        parse_config(["--arch", "resnet51"])
    assert "resnet51" in capsys.readouterr().err


def test_parser_has_every_field():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    assert set(FIELD_NAMES) <= dests


@pytest.mark.parametrize("argv", [
    [],
    ["--preset", "bs256_200ep"],
    ["--preset", "demo_cpu", "--data_path", 'odd "dir"\\with\tstuff/é', "--run_dir", "r d", "--wd", "1e-6"],
])
def test_to_toml_round_trip(tmp_path, argv):
    cfg = parse_config(argv, world_size=4)
    f = tmp_path / "config.toml"
    f.write_text(to_toml(cfg))
    values = load_toml(f)
    assert set(values) == set(FIELD_NAMES)
    assert Config(**values) == cfg
    assert parse_config(["--preset", str(f)], world_size=4) == cfg


def test_to_toml_round_trip_control_characters(tmp_path):
    # A path with a newline is legal on Linux; to_toml must escape it for load_toml to read it back.
    cfg = Config(data_path="line1\nline2", run_dir="a\x01b")
    f = tmp_path / "config.toml"
    f.write_text(to_toml(cfg))
    assert Config(**load_toml(f)) == cfg


def test_resume_auto_uses_saved_config(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = dataclasses.replace(parse_config(["--preset", "demo_cpu"]), epochs=6, base_lr=0.7,
                                stop_after_epoch=2, resume="", run_dir=str(run_dir), seed=5)
    text = to_toml(saved).replace('resume = ""', 'resume = "some/other.pt"')
    (run_dir / "config.toml").write_text(text)
    cfg = parse_config(["--run_dir", str(run_dir), "--resume", "auto"])
    assert cfg.epochs == 6 and cfg.base_lr == 0.7 and cfg.seed == 5
    assert cfg.arch == "resnet18" and cfg.nmb_prototypes == 30  # the saved run's values, not the defaults
    assert cfg.resume == "auto"
    assert cfg.stop_after_epoch == 0  # per-invocation: not taken from the file
    # Flags still win over the saved config.
    cfg = parse_config(["--run_dir", str(run_dir), "--resume", "auto", "--epochs", "8", "--stop_after_epoch", "3"])
    assert cfg.epochs == 8 and cfg.stop_after_epoch == 3 and cfg.base_lr == 0.7
    # With a preset the preset is the base, not the saved file.
    cfg = parse_config(["--preset", "demo_cpu", "--run_dir", str(run_dir), "--resume", "auto"])
    preset = load_toml(preset_path("demo_cpu"))
    assert (cfg.epochs, cfg.base_lr) == (preset["epochs"], preset["base_lr"]) != (6, 0.7)
    # Without a saved config: plain defaults.
    cfg = parse_config(["--run_dir", str(tmp_path / "fresh"), "--resume", "auto"])
    assert cfg.epochs == Config().epochs


def test_resume_path_uses_the_checkpoint_config(tmp_path):
    from swav_fast.checkpoint import FORMAT

    saved = dataclasses.replace(parse_config(["--preset", "demo_cpu"]), epochs=6, base_lr=0.7, seed=5,
                                run_dir=str(tmp_path / "old_run"), stop_after_epoch=2)
    path = tmp_path / "ckpt_000000040.pth"
    torch.save({"format": FORMAT, "config": {**dataclasses.asdict(saved), "retired_option": 1},
                "model": {"w": torch.zeros(3)}}, path)
    cfg = parse_config(["--resume", str(path)])
    assert (cfg.epochs, cfg.base_lr, cfg.seed, cfg.arch, cfg.nmb_prototypes) == (6, 0.7, 5, "resnet18", 30)
    assert cfg.run_dir == Config().run_dir  # where this launch writes: --run_dir or the default, not the old one
    assert cfg.stop_after_epoch == 0 and cfg.resume == str(path)  # per-invocation options are this launch's
    cfg = parse_config(["--resume", str(path), "--epochs", "9", "--run_dir", str(tmp_path / "new")])
    assert (cfg.epochs, cfg.base_lr, cfg.run_dir) == (9, 0.7, str(tmp_path / "new"))  # flags win
    preset = load_toml(preset_path("bs256_200ep"))
    cfg = parse_config(["--preset", "bs256_200ep", "--resume", str(path)])
    assert (cfg.epochs, cfg.base_lr) == (preset["epochs"], preset["base_lr"])  # a preset is the base instead
    # a file that is not a swav_fast checkpoint gives the defaults here (train.py names the problem when loading)
    for other in (tmp_path / "trunk.pth", tmp_path / "junk.pth"):
        torch.save({"conv1.weight": torch.zeros(1)}, other) if other.name == "trunk.pth" else other.write_bytes(b"x")
        assert parse_config(["--resume", str(other)]).base_lr == Config().base_lr


def test_help_lists_every_field():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in FIELD_NAMES:
        assert re.search(rf"--{name}\b", proc.stdout), name
    assert "--preset" in proc.stdout
