"""End to end: train.py on tiny real data, single process and under torchrun, resume, export, bad input."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import run_torchrun

import train
from pipelines.spec import DataWarning
from swav_fast import checkpoint as ckpt
from swav_fast.optim import lr_schedule

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--arch", "resnet18", "--nmb_crops", "2", "2", "--size_crops", "32", "16", "--min_scale_crops", "0.3", "0.1",
    "--max_scale_crops", "1", "0.3", "--hidden_mlp", "32", "--feat_dim", "16", "--nmb_prototypes", "10",
    "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1", "--base_lr", "0.6", "--final_lr", "0.0006",
    "--max_steps_per_epoch", "4", "--queue_length", "16", "--epoch_queue_starts", "0",
    "--freeze_prototypes_niters", "3", "--workers", "0", "--log_every", "1", "--device", "cpu",
]


def latest(run_dir: Path) -> Path:
    return ckpt.list_checkpoints(run_dir)[-1]


def run(data: Path, run_dir: Path, *extra: str) -> int:
    return train.main([*TINY, "--data_path", str(data), "--run_dir", str(run_dir), *extra])


def step_losses(run_dir: Path, epoch: int) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("epoch") == epoch and "event" not in r]


def test_two_epochs_then_resume_gives_the_same_losses(digits_dir, tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run(digits_dir, full) == 0
    err = capsys.readouterr().err
    assert "exported the trunk" in err and "stopped" not in err and "--resume auto" not in err  # a finished run
    assert run(digits_dir, split, "--stop_after_epoch", "1") == 0
    err = capsys.readouterr().err
    assert "stopped after epoch 1 of 2 as asked" in err and "--resume auto" in err and "exported" not in err
    assert not (split / "trunk_resnet18.pth").exists()  # not finished yet
    state = ckpt.load(latest(split))
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0 and state["iteration"] == 4
    assert state["queue"]["n_pushed"] == 4 and state["queue"]["buffers"][0].abs().sum() > 0
    # resume with nothing but the run directory: the saved config is the base
    assert train.main(["--run_dir", str(split), "--resume", "auto"]) == 0
    # rates and ETA leave out each launch's first step (compiling, capturing, the loader's start): its window
    # (--log_every 1) has none, and the epoch line of that step says so
    err = capsys.readouterr().err
    first, second = (line for line in err.splitlines() if line.startswith(("epoch 2 step 1/", "epoch 2 step 2/")))
    assert "samples/s" not in first and "ETA" not in first, first
    assert "samples/s, ETA" in second, second
    assert re.search(r"epoch 2/2: mean loss .* samples/s after the first step \(which took \d+\.\d s\)", err), err
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    rates = {r["iteration"]: "samples_per_s" in r for r in rows if "event" not in r and "loss_last" in r}
    assert rates == {i: i not in (1, 5) for i in range(1, 9)}, rates  # two launches: iterations 1 and 5 first

    epoch1, epoch2 = step_losses(full, 0), step_losses(full, 1)
    assert len(epoch1) == 4 and len(epoch2) == 4
    assert all(torch.isfinite(torch.tensor(epoch1 + epoch2)))
    assert step_losses(split, 0) == epoch1
    assert step_losses(split, 1) == epoch2  # bit-equal on CPU: same batches, views, model, optimiser, queue
    a = torch.load(full / "trunk_resnet18.pth")
    b = torch.load(split / "trunk_resnet18.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exported_trunk_loads_into_torchvision(digits_dir, tmp_path):
    assert run(digits_dir, tmp_path / "r", "--epochs", "1", "--warmup_epochs", "0") == 0
    state = torch.load(tmp_path / "r" / "trunk_resnet18.pth", weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    init = torch.load(tmp_path / "r" / "trunk_init_resnet18.pth", weights_only=True)
    assert not torch.equal(init["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])  # it trained
    config = (tmp_path / "r" / "config.toml").read_text()
    assert 'arch = "resnet18"' in config and "nmb_prototypes = 10" in config
    assert json.loads((tmp_path / "r" / "run_info.json").read_text())["git_revision"]


def test_freeze_window_leaves_prototypes_untouched(digits_dir, tmp_path):
    run_dir = tmp_path / "r"
    assert run(digits_dir, run_dir, "--epochs", "2", "--stop_after_epoch", "1", "--freeze_prototypes_niters", "4") == 0
    model = ckpt.load(latest(run_dir))["model"]
    torch.manual_seed(31)  # the run's seed: rebuild its initial prototypes
    from swav_fast.model import SwAVModel

    init = SwAVModel("resnet18", 32, 16, 10)
    init.normalize_prototypes()
    # only the per-step normalisation touched them (frozen for all 4 steps of epoch 1)
    assert torch.allclose(model["prototypes.weight"], init.prototypes.weight, atol=1e-6)
    assert not torch.allclose(model["projection_head.3.weight"], init.projection_head[3].weight)


def test_torchrun_two_ranks_on_cpu(digits_dir, tmp_path, capsys):
    run_dir = tmp_path / "ddp"
    proc = run_torchrun(["train.py", *TINY, "--batch_size", "4", "--data_path", str(digits_dir), "--run_dir",
                         str(run_dir)], 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plain BatchNorm" in proc.stderr  # the CPU note about SyncBN
    state = ckpt.load(latest(run_dir))
    assert state["world_size"] == 2 and len(state["queue"]["buffers"]) == 2
    # each rank keeps its own queue of its own shard's embeddings
    assert not torch.equal(state["queue"]["buffers"][0], state["queue"]["buffers"][1])
    assert (run_dir / "trunk_resnet18.pth").is_file()
    assert len(step_losses(run_dir, 1)) == 4
    # resumed by a single process: the two ranks' queues are dealt into one, which is full and in use at once
    saved = state["queue"]["buffers"]
    assert run(digits_dir, run_dir, "--batch_size", "4", "--epochs", "3", "--max_steps_per_epoch", "2",
               "--resume", "auto") == 0
    assert "2 rank(s) x 8 rows redistributed over 1 rank(s) x 16 rows, in use" in capsys.readouterr().err
    state = ckpt.load(latest(run_dir))
    assert state["world_size"] == 1 and state["queue"]["buffers"][0].shape == (2, 16, 16)
    # after 2 more pushes of 4 rows, the newer half of the dealt rows is below them: rows 0-3 of rank 0, 1 in turn
    torch.testing.assert_close(state["queue"]["buffers"][0][:, 16 - 8:],
                               torch.stack([b[:, i] for i in range(4) for b in saved], dim=1), rtol=0, atol=0)


_NODE_LOCAL_RUN_DIR = r'''
import os, sys
import train
if os.environ["RANK"] == "1":  # rank 1's node sees an empty --run_dir, as a node-local disk would be
    train.ckpt.list_checkpoints = lambda run_dir: []
    train.ckpt.load_latest = lambda run_dir, warn=print: None
train.run_main(lambda: train.main(sys.argv[1:]))
'''


def test_ranks_that_see_different_run_directories_stop_with_a_clear_error(digits_dir, tmp_path):
    """--resume auto where one node does not see the run directory (node-local disk): rank 0 would resume and rank
    1 start afresh, and the two would wait for each other in mismatched collectives. Every rank stops at once."""
    run_dir, script = tmp_path / "r", tmp_path / "node_local.py"
    assert run(digits_dir, run_dir, "--batch_size", "4", "--stop_after_epoch", "1") == 0
    script.write_text(_NODE_LOCAL_RUN_DIR)
    proc = run_torchrun([str(script), "--run_dir", str(run_dir), "--resume", "auto"], 240, {"PYTHONPATH": str(REPO)})
    assert proc.returncode != 0
    newest = ckpt.list_checkpoints(run_dir)[-1]
    digest = newest.with_name(newest.name + ".sha256").read_text()[:16]
    assert (f"the ranks see different runs (newest checkpoint: '{newest} (sha256 {digest})' on rank 0, None on rank "
            "1). --run_dir must be one directory on a filesystem that every node sees") \
        in " ".join(proc.stderr.split()), proc.stderr[-3000:]
    assert ckpt.list_checkpoints(run_dir) == [newest]  # nothing written


_FAILS_ON_RANK_1 = r'''
import os, sys
import train
if os.environ["RANK"] == "1":  # what only rank 1's node sees
    what = os.environ["FAIL"]
    if what == "data":  # e.g. a .beton corrupted on that node's local disk
        def build(*args, **kwargs):
            raise ValueError("/data/train.beton is truncated, say")
        train.pipelines.build = build
    elif what == "resume":  # its copy of the checkpoint fails its checks, and no older one passes them
        def load_latest(run_dir, warn=print):
            raise train.ckpt.CheckpointError("no usable checkpoint, say")
        train.ckpt.load_latest = load_latest
    elif what == "older":  # it skips the newest checkpoint, a partial copy there, and takes the one before
        def load_latest(run_dir, warn=print):
            older = train.ckpt.list_checkpoints(run_dir)[-2]
            return older, train.ckpt.load(older)
        train.ckpt.load_latest = load_latest
train.run_main(lambda: train.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("fail, message", [
    ("data", "rank 1: data error: /data/train.beton is truncated, say"),
    ("resume", "rank 1: resume error: no usable checkpoint, say"),
    ("older", "resume error: the ranks would resume from different checkpoints (checkpoint resumed from: ")])
def test_a_setup_failure_on_one_rank_stops_every_rank_at_once(digits_dir, tmp_path, fail, message):
    """A setup step that fails on one rank only (the data, the checkpoint it reads): every rank stops with exit
    code 2, the failing rank says why with its number, rank 0 says another rank failed; before, that rank left
    and the others waited for it in their next collective (NCCL: its 10-minute watchdog), with no message from
    rank 0. A rank that falls back to an older checkpoint than the others is stopped too."""
    run_dir, script = tmp_path / "r", tmp_path / "fails_on_rank_1.py"
    assert run(digits_dir, run_dir, "--batch_size", "4", "--epochs", "3", "--stop_after_epoch", "2") == 0
    script.write_text(_FAILS_ON_RANK_1)
    before = ckpt.list_checkpoints(run_dir)
    proc = run_torchrun([str(script), "--run_dir", str(run_dir), "--resume", "auto"], 240,
                        {"PYTHONPATH": str(REPO), "FAIL": fail})
    text = " ".join(proc.stderr.split())
    assert proc.returncode != 0 and message in text, proc.stderr[-3000:]
    if fail != "older":
        assert "stopped: another rank failed to set up" in text
    assert "exitcode: 2" in proc.stderr and 'train.py", line' not in proc.stderr  # torchrun's traceback only
    assert ckpt.list_checkpoints(run_dir) == before  # nothing written


def test_first_disagreement_names_the_fact_and_the_rank():
    from swav_fast.distributed import first_disagreement

    same = {"configuration": {"batch_size": 64, "epochs": 200}, "newest checkpoint": "r/ckpt_4.pth"}
    assert first_disagreement([same, same, same]) is None
    other = {"configuration": {"batch_size": 32, "epochs": 200}, "newest checkpoint": None}
    assert first_disagreement([same, same, other]) == "configuration: batch_size 64 on rank 0, 32 on rank 2"
    assert first_disagreement([same, same | {"newest checkpoint": None}]) == \
        "newest checkpoint: 'r/ckpt_4.pth' on rank 0, None on rank 1"


def test_resume_with_another_global_batch_keeps_its_place(digits_dir, tmp_path, capsys):
    """A mid-epoch checkpoint resumed with another global batch (here the batch size; another rank count is the
    same arithmetic) goes on at the same image of the epoch's order, at the new schedule's iteration for it."""
    first, second = tmp_path / "bs8", tmp_path / "bs4"
    opts = ["--max_steps_per_epoch", "0", "--checkpoint_every_steps", "3", "--keep_checkpoints", "10",
            "--checkpoint_every_minutes", "0"]
    assert run(digits_dir, first, *opts) == 0  # 100 images: 2 epochs of 12 steps of 8
    mid = ckpt.checkpoint_path(first, 15)
    assert (ckpt.load(mid)["epoch"], ckpt.load(mid)["step_in_epoch"]) == (1, 3)  # 24 images into epoch 2
    capsys.readouterr()
    assert run(digits_dir, second, *opts, "--batch_size", "4", "--resume", str(mid)) == 0
    err = capsys.readouterr().err
    assert "24 images into epoch 2 with a global batch of 8; with 4 this run goes on from step 6" in err
    # same queue length, but its push count was in batches of 8: the rows are counted again in batches of 4
    assert "1 rank(s) x 16 rows redistributed over 1 rank(s) x 16 rows, in use" in err
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "event" not in r]
    assert len(steps) == 25 - 6  # steps 6 .. 24 of the 25 of 4 images
    cfg = ckpt.load(latest(second))["config"]
    lrs = lr_schedule(cfg["base_lr"], cfg["final_lr"], 2, 25, cfg["warmup_epochs"], cfg["start_warmup"])
    assert [r["lr"] for r in steps] == pytest.approx([float(lrs[25 + s]) for s in range(6, 25)], rel=1e-12)
    # the step counter that names the checkpoints keeps counting up from the checkpoint's, so --resume auto
    # still finds the newest one
    assert [r["iteration"] for r in steps] == list(range(16, 16 + 19))


def test_shutdown_drops_ddp_reducer_before_the_group(tmp_path):
    """shutdown(ddp) frees DDP's reducer (an owner of the process group) before destroying the group, so that the
    group is not freed later by the reducer with the GIL held (a gloo exit deadlock seen with torch 2.11)."""
    import torch.distributed as dist

    from swav_fast.distributed import shutdown

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ddp = None
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        ddp(torch.randn(4, 3)).sum().backward()
        assert hasattr(ddp, "reducer") and hasattr(ddp, "logger")
    finally:
        shutdown(ddp)
    assert not dist.is_initialized()
    assert not hasattr(ddp, "reducer") and not hasattr(ddp, "logger")
    shutdown(torch.nn.Linear(3, 2))  # no group, no DDP: nothing to do


_EXIT_PROCESS = r'''
import atexit, os, signal, sys
from swav_fast.distributed import init_distributed, run_main, shutdown
atexit.register(lambda: print("teardown ran", flush=True))
# torchrun sends SIGTERM to the ranks still running when one leaves: each must leave by itself here
signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main():
    if os.environ.get("WORLD_SIZE", "1") != "1":
        init_distributed("cpu")
        shutdown()
    sys.stdout.write("unflushed output of rank " + os.environ.get("RANK", "-"))  # no newline: still buffered
    if os.environ.get("RANK") == "1":
        raise RuntimeError("an unexpected error")
    return 5


run_main(main)
'''


def test_run_main_skips_the_teardown_only_after_a_process_group(tmp_path):
    """A rank that joined a group ends with os._exit (its output flushed, its status kept, an unexpected error
    printed with its traceback and status 1): a gloo worker thread that frees a collective's tensors during the
    interpreter's teardown aborts the process (see exit_process). Without a group it is sys.exit, with the
    teardown."""
    script = tmp_path / "leave.py"
    script.write_text(_EXIT_PROCESS)
    alone = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert alone.returncode == 5 and alone.stdout == "unflushed output of rank -teardown ran\n", alone
    ranks = run_torchrun([str(script)], 120, {"PYTHONPATH": str(REPO)})
    assert ranks.returncode != 0 and "exitcode  : 5" in ranks.stderr, ranks.stderr[-2000:]
    assert "exitcode  : 1" in ranks.stderr and "RuntimeError: an unexpected error" in ranks.stderr
    assert "teardown ran" not in ranks.stdout
    assert "unflushed output of rank 0" in ranks.stdout and "unflushed output of rank 1" in ranks.stdout


def test_existing_run_is_not_overwritten(digits_dir, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert run(digits_dir, run_dir, "--epochs", "2", "--stop_after_epoch", "1") == 0
    before = latest(run_dir).read_bytes()
    assert run(digits_dir, run_dir) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert latest(run_dir).read_bytes() == before


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_bad_data_directory_fails_clearly(tmp_path, capsys, what):
    data = tmp_path / "data"
    if what == "empty":
        data.mkdir()
    assert run(data, tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert str(data) in err and ("does not exist" in err or "no class sub-folders" in err)
    assert not ckpt.list_checkpoints(tmp_path / "r")


def test_run_directory_that_cannot_be_written_fails_clearly(digits_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("in the way")
    run_dir = tmp_path / "a_file" / "run"
    assert run(digits_dir, run_dir) == 2
    err = capsys.readouterr().err
    assert f"cannot write in --run_dir {run_dir}" in err and "NotADirectoryError" in err, err[-2000:]


def test_initial_trunk_that_cannot_be_written_fails_clearly(digits_dir, tmp_path, monkeypatch, capsys):
    def full_disk(state, path):  # the run directory was made, the trunk's MB do not fit
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "export_trunk", full_disk)
    run_dir = tmp_path / "r"
    assert run(digits_dir, run_dir) == 2
    err = capsys.readouterr().err
    assert f"cannot write in --run_dir {run_dir}" in err and "trunk_init_resnet18.pth" in err, err[-2000:]
    assert not ckpt.list_checkpoints(run_dir)


def test_a_failed_resume_leaves_the_run_records_as_they_were(digits_dir, tmp_path, capsys):
    """A resume that fails during setup (a mistyped --data_path, a model option the checkpoint does not fit) must
    not save its options: config.toml is the base of the next `--resume auto`, which would fail the same way."""
    run_dir = tmp_path / "r"
    assert run(digits_dir, run_dir, "--stop_after_epoch", "1", "--resume", "auto") == 0
    assert f"no checkpoint in {run_dir}: a new run" in capsys.readouterr().err
    config, info = (run_dir / "config.toml").read_text(), json.loads((run_dir / "run_info.json").read_text())
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto", "--data_path", str(tmp_path / "typo")]) == 2
    assert "data error" in capsys.readouterr().err
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto", "--nmb_prototypes", "12"]) == 2
    err = capsys.readouterr().err
    assert "resume error" in err and "--nmb_prototypes 10 (this run: 12)" in err and "Traceback" not in err, err
    assert (run_dir / "config.toml").read_text() == config
    assert json.loads((run_dir / "run_info.json").read_text()) == info
    # the run goes on from its saved config; a changed option is named
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto", "--collapse_margin", "0.03"]) == 0
    assert "options changed since the checkpoint: collapse_margin 0.02 -> 0.03" in capsys.readouterr().err
    assert "collapse_margin = 0.03" in (run_dir / "config.toml").read_text()
    launches = json.loads((run_dir / "run_info.json").read_text())
    assert info.pop("earlier_launches") == []
    assert launches["earlier_launches"] == [info] and "--collapse_margin" in launches["argv"]
    # a finished run extended: the cosine is drawn again over the new length, and the run says so
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto", "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert "options changed since the checkpoint: epochs 2 -> 3" in err
    lr = lr_schedule(0.6, 0.0006, 3, 4, 1)[8]
    assert f"the learning-rate schedule follows the new options: lr {lr:.4g} at this step" in err, err


def test_a_second_run_on_a_locked_run_directory_stops_at_once(digits_dir, tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    holder = subprocess.Popen(  # a POSIX lock belongs to a process: another one must hold it
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from swav_fast import checkpoint as c; "
         f"f = c.lock_run_dir(Path({str(run_dir)!r})); print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run(digits_dir, run_dir) == 2
        err = capsys.readouterr().err
        assert f"another train.py is using --run_dir {run_dir} (pid {holder.pid} on " in err, err
        assert not ckpt.list_checkpoints(run_dir) and not (run_dir / "config.toml").exists()
    finally:
        holder.kill()
        holder.wait()
    lock = ckpt.lock_run_dir(run_dir)  # the system dropped the killed holder's lock
    assert lock is not None and f"pid {os.getpid()} on " in (run_dir / "train.lock").read_text()
    lock.close()


def test_run_directory_that_is_a_file_fails_clearly(digits_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("in the way")
    assert run(digits_dir, tmp_path / "a_file") == 2
    assert f"--run_dir {tmp_path / 'a_file'} is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "in the way"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_config_error(digits_dir, tmp_path, capsys):
    assert run(digits_dir, tmp_path / "r", "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "config error" in err and "--device cuda" in err and "Traceback" not in err


def test_split_named_class_folders_are_pointed_out(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    assert train.split_named_classes(str(tmp_path / "d")) == []  # a class that happens to be called train
    (tmp_path / "d" / "val").mkdir()
    (tmp_path / "d" / "cats").mkdir()
    assert train.split_named_classes(str(tmp_path / "d")) == ["train", "val"]
    assert train.split_named_classes(str(tmp_path / "d" / "missing")) == []


def test_data_warnings_print_as_one_line():
    fmt = train.brief_data_warnings(warnings.formatwarning)
    assert fmt("skipped image a.jpg; replaced by b.jpg", DataWarning, "/x/train.py", 5, "for b in loader:") == (
        "warning: skipped image a.jpg; replaced by b.jpg\n")
    other = fmt("something else", UserWarning, "/x/y.py", 7, "code()")
    assert "/x/y.py:7: UserWarning: something else" in other


def test_bad_config_value_fails_before_any_work(digits_dir, tmp_path, capsys):
    assert run(digits_dir, tmp_path / "r", "--crops_for_assign", "0", "7") == 2
    err = capsys.readouterr().err
    assert "--crops_for_assign" in err and "out of range" in err
    assert not (tmp_path / "r").exists()


def test_corrupt_image_is_counted_in_metrics(digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    victim = sorted((data / "7").iterdir())[0]
    victim.write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match=victim.name):
        assert run(data, tmp_path / "r", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "25",
                   "--queue_length", "0") == 0
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "epoch" and rows[-1]["skipped_images"] == 1
    assert victim.read_bytes() == b"not a jpeg at all"


def test_resume_from_a_corrupt_checkpoint_names_it(digits_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    assert run(digits_dir, tmp_path / "r", "--resume", str(bad)) == 2
    assert str(bad) in capsys.readouterr().err
    # an official checkpoint (or a trunk) is not a run to continue: the message says how to start from it
    official = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save({"module.conv1.weight": torch.zeros(64, 3, 7, 7)}, official)
    assert run(digits_dir, tmp_path / "r", "--resume", str(official)) == 2
    err = capsys.readouterr().err
    assert f"{official} is not a swav_fast checkpoint" in err and "pass it to --init_from" in err, err


def test_resume_path_into_a_run_that_went_further_is_refused(digits_dir, tmp_path, capsys):
    # rolling a run back in its own directory would leave the newer checkpoints beside the new branch's ones
    run_dir = tmp_path / "r"
    opts = ["--checkpoint_every_steps", "2", "--keep_checkpoints", "10", "--checkpoint_every_minutes", "0"]
    assert run(digits_dir, run_dir, *opts) == 0
    kept = ckpt.list_checkpoints(run_dir)
    assert [ckpt.load(p)["iteration"] for p in kept] == [2, 4, 6, 8]
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert run(digits_dir, run_dir, *opts, "--resume", str(kept[1])) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"{run_dir} holds checkpoints past iteration 4 of {kept[1]} (the newest: {kept[-1].name}); continuing "
            "there would mix two runs' checkpoints and metrics. Pass another --run_dir, or move those checkpoints "
            "out of") in err, err
    assert ckpt.list_checkpoints(run_dir) == kept and (run_dir / "metrics.jsonl").read_bytes() == metrics
    # from its newest checkpoint, or into another directory, it goes on
    assert run(digits_dir, run_dir, *opts, "--resume", str(kept[-1])) == 0
    assert run(digits_dir, tmp_path / "branch", *opts, "--resume", str(kept[1])) == 0
    assert ckpt.load(ckpt.list_checkpoints(tmp_path / "branch")[-1])["iteration"] == 8


def test_init_from_an_official_layout_checkpoint(digits_dir, tmp_path):
    from swav_fast.model import SwAVModel

    torch.manual_seed(123)
    source = SwAVModel("resnet18", 32, 16, 10)
    official = tmp_path / "swav_official.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, official)
    run_dir = tmp_path / "r"
    assert run(digits_dir, run_dir, "--epochs", "1", "--warmup_epochs", "0", "--init_from", str(official)) == 0
    init = torch.load(run_dir / "trunk_init_resnet18.pth", weights_only=True)
    assert all(torch.equal(init[k], v) for k, v in source.state_dict().items() if k in init)
    assert (run_dir / "plots" / "loss.png").is_file()  # plots are made at the end of every run
    assert run(digits_dir, tmp_path / "r2", "--init_from", str(tmp_path / "missing.pth")) == 2


@pytest.fixture(scope="module")
def digits_beton(digits_dir, tmp_path_factory) -> Path:
    pytest.importorskip("ffcv", reason="SKIPPED: ffcv is not installed (make env installs it)")
    from tools.write_ffcv import write_beton

    out = tmp_path_factory.mktemp("beton") / "digits.beton"
    write_beton(digits_dir, out, workers=1, progress=False)
    return out


@pytest.mark.parametrize("pipeline", ["ffcv", "dali"])
def test_gpu_pipelines_train_and_resume_bit_equal_on_cpu(digits_dir, tmp_path, request, pipeline):
    pytest.importorskip("nvidia.dali" if pipeline == "dali" else "ffcv", reason=f"SKIPPED: {pipeline} not installed")
    data = request.getfixturevalue("digits_beton") if pipeline == "ffcv" else digits_dir
    full, split = tmp_path / "full", tmp_path / "split"
    opts = ("--pipeline", pipeline, "--workers", "1")
    assert run(data, full, *opts) == 0
    assert run(data, split, *opts, "--stop_after_epoch", "1") == 0
    assert train.main(["--run_dir", str(split), "--resume", "auto"]) == 0
    losses = step_losses(full, 0) + step_losses(full, 1)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert step_losses(split, 0) + step_losses(split, 1) == losses
    assert (full / "trunk_resnet18.pth").exists()


@pytest.mark.parametrize("pipeline", ["ffcv", "reference"])
def test_wrong_kind_of_data_path_fails_clearly(digits_dir, digits_beton, tmp_path, capsys, pipeline):
    # ffcv given a folder, reference given a .beton: one line saying what to pass, exit 2, nothing written
    data = digits_dir if pipeline == "ffcv" else digits_beton
    assert run(data, tmp_path / "r", "--pipeline", pipeline) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert "data error" in text and str(data) in text
    assert ("write_ffcv.py" in text) if pipeline == "ffcv" else ("is a file, not a directory" in text)
    assert not (tmp_path / "r").exists()  # the run directory this launch made is gone again, lock file and all


def test_a_failed_start_leaves_no_empty_run_directory(digits_dir, tmp_path, capsys):
    # new folders: all removed; a folder that was there: kept, without the lock file; a resumable run: untouched
    assert run(tmp_path / "typo", tmp_path / "runs" / "a" / "r") == 2
    assert "data error" in capsys.readouterr().err and not any(tmp_path.iterdir())
    (tmp_path / "mine").mkdir()
    assert run(tmp_path / "typo", tmp_path / "mine") == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    run_dir = tmp_path / "r"
    assert run(digits_dir, run_dir, "--stop_after_epoch", "1") == 0
    before = sorted(p.name for p in run_dir.iterdir())
    assert ckpt.LOCK_FILE in before
    assert run(tmp_path / "typo", run_dir, "--resume", "auto") == 2
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_cuda_index_of_a_local_rank():
    from swav_fast.distributed import cuda_index

    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # torchrun: every GPU of the node visible
    assert cuda_index(3, 1) == 0  # SLURM --gpus-per-task=1: each process sees only its own GPU
    assert cuda_index(3, 1, 4, "2") == 0  # torchrun, each rank given its GPU through CUDA_VISIBLE_DEVICES
    with pytest.raises(RuntimeError, match=r"4 processes on this node .* but it has one GPU.*--nproc_per_node=1"):
        cuda_index(1, 1, 4, None)  # torchrun --nproc_per_node=4 on a machine with one GPU
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 4, but this process sees 4 GPUs.*--nproc_per_node=4"):
        cuda_index(4, 4)


def test_init_distributed_refuses_a_device_it_would_misread():
    # "cuda:1" is not "cuda": without the check it would have meant the CPU and gloo
    from swav_fast.distributed import DeviceError, init_distributed

    with pytest.raises(DeviceError, match=r"device 'cuda:1': pass auto, cuda or cpu"):
        init_distributed("cuda:1")


DIST_TIMEOUT_SCRIPT = """
import os, sys, time
import torch
import torch.distributed as dist
from swav_fast.distributed import init_distributed, shutdown, syncbn_group, exit_now

info = init_distributed("cpu", float(sys.argv[1]))
group = syncbn_group(info, 2)  # a group made after the start: it must carry the timeout too
if info.rank == 1:
    time.sleep(15)  # takes part in nothing: rank 0 waits for it
else:
    for name, g in (("world", None), ("syncbn", group)):
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=g)
            print(f"{name}: no error", flush=True)
        except Exception as e:
            print(f"{name}: {type(e).__name__} after {time.monotonic() - start:.1f} s: {str(e)[:200]}", flush=True)
exit_now(0)
"""


def test_dist_timeout_applies_to_every_group(tmp_path):
    # --dist_timeout_minutes reaches the world group and the groups made after it (SyncBN's); with torch's default
    # (30 minutes with gloo) rank 0 would wait until rank 1 leaves, 15 s later, and fail on the closed connection
    script = tmp_path / "timeout_probe.py"
    script.write_text(DIST_TIMEOUT_SCRIPT)
    repo = str(Path(__file__).resolve().parents[1])
    result = run_torchrun([str(script), "0.05"], timeout=120, env={"PYTHONPATH": repo})
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if ": " in line}
    for name in ("world", "syncbn"):
        found = re.search(r"after ([\d.]+) s: (.*)", lines.get(name, ""))
        assert found, result.stdout + result.stderr
        assert float(found.group(1)) < 10, lines[name]
        assert "timed out" in found.group(2).lower() or "timeout" in found.group(2).lower(), lines[name]
