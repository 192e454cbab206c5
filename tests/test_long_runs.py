"""Long-run safety: resume at any step after SIGKILL or SIGTERM, checksummed checkpoints, NaN and collapse guards."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_torchrun, stop_torchrun

import train
from swav_fast import checkpoint as ckpt
from swav_fast import guards
from swav_fast import step as step_module
from swav_fast.guards import CollapseMonitor, LossLog, NonFiniteLoss, first_non_finite
from tests.test_train import REPO, TINY, run

# 3 epochs of 4 steps, a checkpoint every 2 steps, every loss logged
LONG = ["--epochs", "3", "--checkpoint_every_steps", "2", "--checkpoint_every_minutes", "0"]


def losses_by_iteration(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every iteration (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "event" not in row:
            out[row["iteration"]] = row["loss"]
    return out


def events(run_dir: Path, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == name]


@pytest.fixture(scope="module")
def reference_run(digits_dir, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert run(digits_dir, run_dir, *LONG) == 0
    losses = losses_by_iteration(run_dir)
    assert sorted(losses) == list(range(1, 13))
    return losses


def start(digits_dir: Path, run_dir: Path, *extra: str, **popen) -> subprocess.Popen:
    """train.py with the LONG settings as a child process, output captured; `popen`: more Popen arguments."""
    cmd = [sys.executable, "train.py", *TINY, *LONG, "--data_path", str(digits_dir), "--run_dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for_iteration(run_dir: Path, proc: subprocess.Popen, iteration: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and any(i >= iteration for i in losses_by_iteration(run_dir)):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"iteration {iteration} not reached in {timeout} s")


def test_sigkill_at_a_random_step_then_resume_matches(digits_dir, tmp_path, reference_run):
    kill_at = random.Random().randint(3, 9)
    run_dir = tmp_path / "killed"
    proc = start(digits_dir, run_dir)
    wait_for_iteration(run_dir, proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.list_checkpoints(run_dir), "a checkpoint every 2 steps should exist by now"
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto"]) == 0
    assert losses_by_iteration(run_dir) == reference_run, f"killed at iteration >= {kill_at}"


def test_sigterm_checkpoints_and_exits_cleanly(digits_dir, tmp_path, reference_run):
    run_dir = tmp_path / "term"
    proc = start(digits_dir, run_dir, "--checkpoint_every_steps", "0")  # only the signal makes a mid-epoch one
    wait_for_iteration(run_dir, proc, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in err
    state = ckpt.load(ckpt.list_checkpoints(run_dir)[-1])
    assert state["iteration"] >= 5
    assert not (run_dir / "trunk_resnet18.pth").exists()
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto"]) == 0
    assert losses_by_iteration(run_dir) == reference_run


def test_ctrl_c_checkpoints_and_exits_cleanly(digits_dir, tmp_path, reference_run):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, DataLoader workers included: the run finishes
    its step, writes a checkpoint and exits 0, and resuming it gives the uninterrupted run's losses."""
    run_dir = tmp_path / "ctrl_c"
    proc = start(digits_dir, run_dir, "--checkpoint_every_steps", "0", "--workers", "2",
                 start_new_session=True)  # its own process group, as a terminal's foreground job
    wait_for_iteration(run_dir, proc, 5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    # said once: the DataLoader workers (forked with train.py's handler) ignore SIGINT instead of answering it too
    assert err.count("Ctrl-C: stopping after this step") == 1 and "stopped by signal SIGINT with a checkpoint" in err
    assert ckpt.load(ckpt.list_checkpoints(run_dir)[-1])["iteration"] >= 5
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto"]) == 0
    assert losses_by_iteration(run_dir) == reference_run


def test_hang_up_checkpoints_though_the_output_has_gone(digits_dir, tmp_path, reference_run):
    """An ssh connection drops: every process of the job gets SIGHUP (DataLoader workers too) and the output has
    nowhere to go (here: the pipes' readers close first, so every later write fails with EPIPE). The run finishes
    its step, writes a checkpoint, exits 0 and says so in metrics.jsonl; resuming gives the uninterrupted losses."""
    run_dir = tmp_path / "hup"
    proc = start(digits_dir, run_dir, "--checkpoint_every_steps", "0", "--workers", "2", start_new_session=True)
    wait_for_iteration(run_dir, proc, 5)
    proc.stdout.close()
    proc.stderr.close()
    os.killpg(proc.pid, signal.SIGHUP)
    assert proc.wait(timeout=120) == 0
    stopped = events(run_dir, "stopped_by_signal")
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGHUP" and stopped[0]["iteration"] >= 5
    lost = events(run_dir, "output_lost")
    assert [e["stream"] for e in lost] == ["stderr"] and "BrokenPipeError" in lost[0]["error"]
    assert ckpt.load(ckpt.list_checkpoints(run_dir)[-1])["iteration"] == stopped[0]["iteration"]
    assert not (run_dir / "trunk_resnet18.pth").exists()
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto"]) == 0
    assert losses_by_iteration(run_dir) == reference_run


_SECOND_SIGNAL = r'''
import os, signal, sys
sys.path.insert(0, os.getcwd())
import train
from swav_fast import step

real_loss, calls, real_shutdown = step.swapped_prediction_loss, [], train.shutdown


def loss(*args, **kwargs):  # the first hang-up, during the 6th step
    calls.append(1)
    if len(calls) == 6:
        os.kill(os.getpid(), signal.SIGHUP)
    return real_loss(*args, **kwargs)


def shutdown(*args, **kwargs):  # the second one, while the run is leaving
    os.kill(os.getpid(), signal.SIGHUP)
    return real_shutdown(*args, **kwargs)


step.swapped_prediction_loss, train.shutdown = loss, shutdown
handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
code = train.main(sys.argv[1:])
assert {sig: signal.getsignal(sig) for sig in handlers} == handlers, "handlers not restored"
sys.exit(code)
'''


def test_a_second_hang_up_while_leaving_does_not_cut_the_end(digits_dir, tmp_path):
    """A hang-up often comes twice (the kernel's, then the shell's to its jobs); the second one, after the
    checkpoint, must not kill the run while it leaves. main() restores the signal handlers it found."""
    script, run_dir = tmp_path / "twice.py", tmp_path / "hup_twice"
    script.write_text(_SECOND_SIGNAL)
    proc = subprocess.run([sys.executable, str(script), *TINY, *LONG, "--data_path", str(digits_dir), "--run_dir",
                           str(run_dir), "--checkpoint_every_steps", "0"], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped by signal SIGHUP with a checkpoint at iteration 6" in proc.stderr
    assert [e["signal"] for e in events(run_dir, "stopped_by_signal")] == ["SIGHUP"]


def test_a_hang_up_ignored_at_the_start_stays_ignored(digits_dir, tmp_path, reference_run):
    """`nohup python train.py ...`: the user asked the run to survive the hang-up, so SIGHUP changes nothing."""
    run_dir = tmp_path / "nohup"
    proc = start(digits_dir, run_dir, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_iteration(run_dir, proc, 5)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by signal" not in err, err[-2000:]
    assert (run_dir / "trunk_resnet18.pth").exists() and not events(run_dir, "stopped_by_signal")
    assert losses_by_iteration(run_dir) == reference_run


def test_output_guard_keeps_the_run_going_when_the_reader_is_gone():
    read, write = os.pipe()
    stream = os.fdopen(write, "w", buffering=1)
    guard = guards.OutputGuard(stream)
    os.close(read)  # the reader died: the next write fails with EPIPE
    assert guard.write("progress line\n") == len("progress line\n")
    assert isinstance(guard.lost, BrokenPipeError)
    # the descriptor now goes to /dev/null: the buffered text and any later writer (C++, the exit's flush) succeed
    assert os.path.samestat(os.fstat(write), os.stat(os.devnull))
    guard.writelines(["dropped\n"])
    guard.flush()
    stream.flush()
    assert guard.isatty() is False and guard.fileno() == write  # the rest is the stream's
    stream.close()

    class Closed:
        def write(self, text):
            raise ValueError("I/O operation on closed file")

    guard = guards.OutputGuard(Closed())
    assert guard.write("x") == 1 and isinstance(guard.lost, ValueError)  # no file descriptor: only dropped


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_under_torchrun_stops_every_rank_at_the_next_agreement(digits_dir, tmp_path, sig):
    """Two ranks act on Ctrl-C together at the next --log_every step (agreed over the host-side gloo group), several
    steps later: until then the DataLoader workers, which got the SIGINT too, must go on serving batches. A hang-up
    (SIGHUP to torchrun's group, as when the terminal closes) is forwarded by torchrun and handled the same way."""
    run_dir = tmp_path / "ctrl_c_ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 100 images, 2 ranks x 4: 2 epochs of 12 steps; loss windows of 8 steps (each epoch starts one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
           "--batch_size", "4", "--max_steps_per_epoch", "0", "--log_every", "8", "--workers", "2",
           "--checkpoint_every_minutes", "0", "--data_path", str(digits_dir), "--run_dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").is_file() or not events(run_dir, "epoch"):  # epoch 1 done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    # early in epoch 2 (the ranks agree at its step 8 or 12); torchrun forwards a second SIGINT to each rank
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=240)
    # torchrun itself exits 1 after a signal (its SignalException), once the ranks have left
    assert f"stopped by signal {sig.name} with a checkpoint" in err, err[-3000:]
    assert "interrupted at iteration" not in err and "KeyboardInterrupt" not in err  # no rank took it for a 2nd press
    state = ckpt.load(ckpt.list_checkpoints(run_dir)[-1])
    assert state["iteration"] in (12 + 8, 12 + 12) and state["world_size"] == 2


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(digits_dir, tmp_path, monkeypatch, capsys):
    real = step_module.swapped_prediction_loss
    calls = []

    def pressed_twice(*args, **kw):  # Ctrl-C, again at once (ignored: the same keypress), and 1.5 s later
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.5)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(step_module, "swapped_prediction_loss", pressed_twice)
    run_dir = tmp_path / "twice"
    handler = signal.getsignal(signal.SIGINT)
    assert run(digits_dir, run_dir, *LONG) == 130
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    err = capsys.readouterr().err
    assert "interrupted at iteration 5, without a checkpoint" in err and "--resume auto" in err
    assert [ckpt.load(p)["iteration"] for p in ckpt.list_checkpoints(run_dir)] == [2, 4]
    assert events(run_dir, "interrupted") == [{"event": "interrupted", "iteration": 5}]


def test_keeps_the_last_k_and_falls_back_from_a_corrupt_one(digits_dir, tmp_path, reference_run, capsys):
    run_dir = tmp_path / "corrupt"
    assert run(digits_dir, run_dir, *LONG, "--stop_after_epoch", "2", "--keep_checkpoints", "2") == 0
    kept = ckpt.list_checkpoints(run_dir)
    assert [ckpt.load(p)["iteration"] for p in kept] == [6, 8]  # the two newest of 2, 4, 6, 8
    previous, newest = kept
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    capsys.readouterr()
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert newest.name in err and previous.name in err and "checksum" in err
    assert losses_by_iteration(run_dir) == reference_run


def test_checkpoint_freq_keeps_epoch_checkpoints_for_good(digits_dir, tmp_path, reference_run, monkeypatch):
    # every 2nd epoch and the last one, beside the newest --keep_checkpoints; the same bytes, not a second copy
    run_dir = tmp_path / "kept"
    assert run(digits_dir, run_dir, *LONG, "--keep_checkpoints", "1", "--checkpoint_freq", "2") == 0
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["ckpt_000000012.pth"]
    kept = sorted((run_dir / ckpt.CHECKPOINT_DIR).glob("epoch_*.pth"))
    assert [p.name for p in kept] == ["epoch_0002.pth", "epoch_0003.pth"]
    assert [(s["epoch"], s["step_in_epoch"], s["iteration"]) for s in map(ckpt.load, kept)] == [(2, 0, 8), (3, 0, 12)]
    assert kept[1].stat().st_ino == ckpt.list_checkpoints(run_dir)[0].stat().st_ino
    assert losses_by_iteration(run_dir) == reference_run
    # a filesystem without hard links gets a copy, with its own checksum file
    monkeypatch.setattr(ckpt.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no links here")))
    state = ckpt.load(kept[0])
    path = ckpt.save_checkpoint(state, tmp_path / "copies", 1, ckpt.kept_checkpoint_path(tmp_path / "copies", 2))
    copy = ckpt.kept_checkpoint_path(tmp_path / "copies", 2)
    assert copy.read_bytes() == path.read_bytes() and copy.stat().st_ino != path.stat().st_ino
    assert ckpt.load(copy)["iteration"] == 8
    assert sorted(p.name for p in copy.parent.iterdir()) == [
        "ckpt_000000008.pth", "ckpt_000000008.pth.sha256", "epoch_0002.pth", "epoch_0002.pth.sha256"]


def test_checkpoint_without_checksum_is_not_trusted(tmp_path):
    path = ckpt.checkpoint_path(tmp_path, 5)
    path.parent.mkdir(parents=True)
    torch.save({"format": ckpt.FORMAT, "iteration": 5}, path)
    with pytest.raises(ckpt.CheckpointError, match="no checksum"):
        ckpt.load(path)
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.load_latest(tmp_path, warn=lambda m: None)
    assert ckpt.load_latest(tmp_path / "empty") is None


@pytest.mark.parametrize("log_every", ["1", "3"])
def test_non_finite_loss_stops_and_names_the_step(digits_dir, tmp_path, monkeypatch, capsys, log_every):
    # the losses reach the host a window late; the checkpoint after the bad step must still wait for them
    real = step_module.swapped_prediction_loss
    calls = []

    def poisoned(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 6 else loss  # the 6th step, iteration index 5

    monkeypatch.setattr(step_module, "swapped_prediction_loss", poisoned)
    run_dir = tmp_path / "nan"
    assert run(digits_dir, run_dir, *LONG, "--log_every", log_every) == 3
    err = capsys.readouterr().err
    assert "iteration 5" in err and "last good checkpoint" in err
    kept = ckpt.list_checkpoints(run_dir)
    assert [ckpt.load(p)["iteration"] for p in kept] == [2, 4]  # nothing saved at or after the bad step
    assert kept[-1].name in err
    assert len(events(run_dir, "non_finite_loss")) == 1


@pytest.mark.parametrize("fails", ["checkpoint", "checksum file"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_clearly(digits_dir, tmp_path, monkeypatch, capsys, fails):
    """A full disk: writing iteration 4's checkpoint fails after its bytes went into the temporary file (at the
    fsync), or its checksum file cannot be written after it. The run stops there with exit code 4, the reason and
    the last good checkpoint; neither the temporary file nor a checkpoint without its checksum is left."""
    doomed = "ckpt_000000004.pth" if fails == "checkpoint" else "ckpt_000000004.pth.sha256"
    real_fsync = os.fsync

    def full_disk(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{doomed}.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", full_disk)
    run_dir = tmp_path / "full"
    assert run(digits_dir, run_dir, *LONG) == 4
    err = capsys.readouterr().err
    assert "could not write the checkpoint of iteration 4" in err and "No space left on device" in err, err[-2000:]
    assert "ckpt_000000002.pth" in err and "--resume auto" in err
    assert sorted(p.name for p in (run_dir / ckpt.CHECKPOINT_DIR).iterdir()) == [
        "ckpt_000000002.pth", "ckpt_000000002.pth.sha256"]  # no temporary file, no unchecked checkpoint
    assert max(losses_by_iteration(run_dir)) == 4  # stopped at once, not an epoch later
    assert len(events(run_dir, "checkpoint_failed")) == 1


def test_a_trunk_that_cannot_be_written_is_written_by_resuming(digits_dir, tmp_path, monkeypatch, capsys):
    real = ckpt.export_trunk

    def full_disk(state, path):  # the disk fills during the run: the initial trunk was written
        if Path(path).name == "trunk_resnet18.pth":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(state, path)

    run_dir = tmp_path / "no_trunk"
    with monkeypatch.context() as m:
        m.setattr(ckpt, "export_trunk", full_disk)
        assert run(digits_dir, run_dir) == 4
    err = capsys.readouterr().err
    assert "could not write the trunk" in err and "No space left on device" in err and "--resume auto" in err
    assert not (run_dir / "trunk_resnet18.pth").exists()
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto"]) == 0  # the finished run: export only
    assert "nothing to train" in capsys.readouterr().err
    assert (run_dir / "trunk_resnet18.pth").exists()


def test_out_of_memory_stops_with_what_to_change(digits_dir, tmp_path, monkeypatch, capsys):
    real, calls = train.train_step, []

    def oom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", oom)
    run_dir = tmp_path / "oom"
    assert run(digits_dir, run_dir, *LONG) == 5
    err = capsys.readouterr().err
    assert "out of memory at iteration 3 (8 images x 4 crops per rank, --step_mode eager)" in err, err[-2000:]
    assert "Tried to allocate 2.00 GiB." in err and "more detail" not in err
    assert "ckpt_000000002.pth" in err and "--batch_size" in err
    assert [e["iteration"] for e in events(run_dir, "out_of_memory")] == [3]


def test_out_of_memory_before_training_names_a_busy_gpu(digits_dir, tmp_path, monkeypatch, capsys):
    """Out of memory while the model moves to the device (a GPU another process holds): exit code 5 and the free
    memory, not a traceback with exit code 1. The CUDA answers are stand-ins, set when the error is raised."""
    def busy_gpu(self, *args, **kwargs):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (0.5 * 2**30, 80 * 2**30))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB\nmore detail")

    monkeypatch.setattr(train.SwAVModel, "to", busy_gpu)
    assert run(digits_dir, tmp_path / "busy", *LONG) == 5
    err = capsys.readouterr().err
    assert "out of memory before training started: CUDA out of memory. Tried to allocate 20.00 MiB." in err, err
    assert "0.5 of 80.0 GiB free" in err and "nvidia-smi" in err
    assert "Traceback" not in err and "more detail" not in err


def test_metrics_that_cannot_be_written_do_not_stop_the_run(digits_dir, tmp_path, capsys):
    """metrics.jsonl on a full disk (/dev/full refuses every write): said once, and the run goes on to its end."""
    run_dir = tmp_path / "no_metrics"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    assert run(digits_dir, run_dir, *LONG) == 0
    err = capsys.readouterr().err
    assert err.count("could not write") == 1 and "metrics.jsonl" in err and "No space left" in err
    assert ckpt.load(ckpt.list_checkpoints(run_dir)[-1])["iteration"] == 12
    assert (run_dir / "trunk_resnet18.pth").exists()


_SAVE_FAILS_ON_RANK_0 = r'''
import os, signal, sys
sys.path.insert(0, os.getcwd())
import train

if os.environ["RANK"] == "0":  # rank 0, the writer, finds the disk full at the first checkpoint
    def full_disk(state, run_dir, keep, keep_also_as=None):
        raise OSError(28, "No space left on device")

    train.ckpt.save_checkpoint = full_disk
else:  # the SIGTERM torchrun sends when rank 0 leaves first must not end rank 1 before it says how it left
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
code = train.main(sys.argv[1:])
print(f"rank {os.environ['RANK']} leaves with exit code {code}", file=sys.stderr, flush=True)
train.run_main(lambda: code)
'''


def test_a_failed_checkpoint_write_stops_every_rank_together(digits_dir, tmp_path):
    """Rank 0 alone writes: its failure reaches the other rank through the agreement after the write, so both
    leave with exit code 4 instead of rank 1 waiting for rank 0 in the next collective."""
    script, run_dir = tmp_path / "save_fails.py", tmp_path / "full_ddp"
    script.write_text(_SAVE_FAILS_ON_RANK_0)
    proc = run_torchrun([str(script), *TINY, "--batch_size", "4", "--checkpoint_every_steps", "2",
                         "--data_path", str(digits_dir), "--run_dir", str(run_dir)], 300)
    assert proc.returncode != 0
    assert "could not write the checkpoint of iteration 2" in proc.stderr, proc.stderr[-3000:]
    assert "rank 1 leaves with exit code 4" in proc.stderr  # by itself: it was told, not left waiting
    assert ckpt.list_checkpoints(run_dir) == []


_NAN_ON_RANK_1 = r'''
import os, sys
sys.path.insert(0, os.getcwd())
import train
from swav_fast import guards

if os.environ["RANK"] == "1":  # rank 1 alone records a non-finite loss for its 4th step (the last of epoch 1)
    real, calls = guards.LossLog.add, []

    def add(self, loss):
        calls.append(1)
        return real(self, loss * float("nan") if len(calls) == 4 else loss)

    guards.LossLog.add = add
train.run_main(lambda: train.main(sys.argv[1:]))
'''


def test_a_non_finite_loss_on_one_rank_stops_every_rank_together(digits_dir, tmp_path):
    """Each rank reads only its own losses, so one may find a NaN when the others do not; the ranks agree on it,
    all stop with the message and nothing is saved (before: that rank left, the others waited for it in the next
    collective until torchrun killed them, and rank 0 never said why)."""
    script, run_dir = tmp_path / "nan_on_rank_1.py", tmp_path / "nan_ddp"
    script.write_text(_NAN_ON_RANK_1)
    proc = run_torchrun([str(script), *TINY, "--batch_size", "4", "--log_every", "2", "--data_path", str(digits_dir),
                         "--run_dir", str(run_dir)], 300)
    assert proc.returncode != 0
    assert "another rank's loss is not finite (by iteration 4" in proc.stderr, proc.stderr[-3000:]
    assert "exitcode: 3" in proc.stderr  # torchrun names a rank that left with the NaN exit code
    assert len(events(run_dir, "non_finite_loss")) == 1
    assert ckpt.list_checkpoints(run_dir) == []  # not even epoch 1's end, whose last step was the bad one


def test_collapsed_run_warns_exactly_once(digits_dir, tmp_path, monkeypatch, capsys):
    ln_k = math.log(10)

    def collapsed(scores, *args, **kw):  # a loss pinned at ln K, still differentiable
        return scores.float().mean() * 0 + ln_k

    monkeypatch.setattr(step_module, "swapped_prediction_loss", collapsed)
    run_dir = tmp_path / "collapse"
    assert run(digits_dir, run_dir, "--collapse_window", "3", "--freeze_prototypes_niters", "2") == 0
    err = capsys.readouterr().err
    assert err.count("probably collapsed") == 1 and "--epsilon 0.03" in err
    warnings = events(run_dir, "collapse_warning")
    assert len(warnings) == 1 and warnings[0]["iteration"] == 5  # steps 2, 3, 4 after the window of 2


def test_collapse_monitor_unit():
    m = CollapseMonitor(ln_k=2.0, margin=0.05, window=3, after_iteration=10)
    assert m.update([2.0] * 10, first_iteration=0) is None  # inside the freeze window: ignored
    assert m.update([2.01, 2.0], first_iteration=10) is None
    assert m.update([1.5], first_iteration=12) is None  # a real drop resets the count
    assert m.update([2.0, 2.0], first_iteration=13) is None
    assert "collapsed" in m.update([1.99], first_iteration=15)
    assert m.update([2.0] * 10, first_iteration=16) is None  # once only
    assert CollapseMonitor(2.0, 0.05, 0, 0).update([2.0] * 100, 0) is None  # window 0: off


def test_first_non_finite_names_the_first_bad_iteration():
    first_non_finite([1.0, 2.0], 7)
    with pytest.raises(NonFiniteLoss, match="iteration 9"):
        first_non_finite([1.0, 2.0, float("inf"), float("nan")], 7)


def test_loss_log_hands_each_window_back_one_window_late():
    log = LossLog(3, "cpu")
    for v in (1.0, 2.0, 3.0):
        log.add(torch.tensor(v))
    assert log.full
    with pytest.raises(RuntimeError, match="full"):
        log.add(torch.tensor(4.0))
    assert log.close_window({"w": "a"}) == []  # copied, not read yet
    log.add(torch.tensor(4.0))
    log.add(torch.tensor(5.0))
    assert log.close_window({"w": "b"}) == [([1.0, 2.0, 3.0], {"w": "a"})]
    assert log.close_window(None, flush=True) == [([4.0, 5.0], {"w": "b"})]  # nothing open: only the pending one
    assert log.close_window(None, flush=True) == []
    log.add(torch.tensor(6.0))
    assert log.close_window({"w": "c"}, flush=True) == [([6.0], {"w": "c"})]


def test_loss_log_waits_only_for_the_window_before(monkeypatch):
    """The CUDA path with the event faked: closing window k waits for window k-1's copy, never for its own."""
    waited = []

    class FakeEvent:
        made = 0

        def __init__(self):
            FakeEvent.made += 1
            self.id = FakeEvent.made

        def record(self, stream):
            pass

        def synchronize(self):
            waited.append(self.id)

    monkeypatch.setattr(guards.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(guards.torch.cuda, "current_stream", lambda device: None)
    log = LossLog(2, "cpu")
    log.cuda = True  # host buffers stay unpinned: there is no CUDA here
    for window in range(3):
        log.add(torch.tensor(float(window)))
        log.close_window({"w": window})
        assert waited == list(range(1, window + 1))  # events 1..window: every earlier window, not this one
    log.close_window(None, flush=True)
    assert waited == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_log_on_cuda_copies_without_a_sync():
    """On CUDA the window's copy goes to pinned memory without blocking: a synchronising copy or .item() inside
    add/close_window would raise under sync debug mode "error" (the event wait for the previous window is an
    explicit Event.synchronize, which the debug mode does not flag)."""
    log = LossLog(4, "cuda")
    assert log.host.is_pinned()
    got = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for window in range(3):
            for i in range(4):
                log.add(torch.full((), 10.0 * window + i, device="cuda"))
            got += log.close_window({"w": window})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got += log.close_window(None, flush=True)
    assert got == [([10.0 * w + i for i in range(4)], {"w": w}) for w in range(3)]


def write_noise_images(root: Path, n: int = 64, size: int = 40) -> Path:
    """root/c<k>/<i>.jpg: random RGB JPEGs in 4 classes, with numpy and PIL only (the GPU machine may lack the
    scikit-learn that the digits fixture needs)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"c{i % 4}" / f"{i}.jpg")
    return root


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_stop_then_resume_on_cuda(tmp_path, capsys, mode):
    # a checkpoint written on the GPU resumes there: its RNG states come back as host tensors (loading it onto
    # the GPU made torch.set_rng_state fail), weights, momentum and queue land on the GPU again
    data, run_dir = write_noise_images(tmp_path / "images"), tmp_path / mode
    cuda = ["--device", "cuda", "--step_mode", mode, "--max_steps_per_epoch", "6"]
    assert run(data, run_dir, *cuda, "--stop_after_epoch", "1") == 0
    assert train.main(["--run_dir", str(run_dir), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "exported the trunk" in err, err
    losses = losses_by_iteration(run_dir)
    assert sorted(losses) == list(range(1, 13)) and all(math.isfinite(v) for v in losses.values())


def test_two_nodes_stopped_by_sigterm_and_resumed_equal_one_uninterrupted_node(digits_dir, tmp_path):
    """The README's multi-node launch (torchrun's c10d rendezvous, one agent per node; here two "nodes" of one
    rank on this machine, sharing the run directory as nodes share a filesystem) gives the numbers of one node with
    two ranks. A SIGTERM to every node's agent (what SLURM's `--signal=TERM@...` sends) reaches the ranks through
    torchrun: they write a checkpoint together, and the same launch with `--resume auto` finishes with the
    uninterrupted run's losses."""
    from conftest import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 100 images, 2 ranks x 4: 2 epochs of 12 steps; the ranks agree on a stop at steps 8 and 12 of an epoch
    opts = [*TINY, "--batch_size", "4", "--max_steps_per_epoch", "0", "--log_every", "8",
            "--checkpoint_every_minutes", "0", "--data_path", str(digits_dir)]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    one_node = tmp_path / "one_node"
    proc = run_torchrun(["train.py", *opts, "--run_dir", str(one_node)], 300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    two_nodes = tmp_path / "two_nodes"

    def launch(*extra: str) -> list[subprocess.Popen]:
        node = [*torchrun, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{free_port()}", f"--rdzv_id=job{time.monotonic_ns()}", "train.py", *opts,
                "--run_dir", str(two_nodes), *extra]
        return [subprocess.Popen(node, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]

    nodes = launch()
    try:
        deadline = time.monotonic() + 240
        while not (two_nodes / "metrics.jsonl").is_file() or not events(two_nodes, "epoch"):  # epoch 1 done
            assert all(p.poll() is None for p in nodes) and time.monotonic() < deadline, "a node stopped or hung"
            time.sleep(0.05)
        for p in nodes:
            p.send_signal(signal.SIGTERM)
        err = "".join(p.communicate(timeout=240)[1] for p in nodes)
    finally:
        stop_torchrun(nodes)
    assert "stopped by signal SIGTERM with a checkpoint" in err, err[-3000:]
    state = ckpt.load(ckpt.list_checkpoints(two_nodes)[-1])
    assert state["iteration"] in (12 + 8, 12 + 12) and state["world_size"] == 2

    nodes = launch("--resume", "auto")
    try:
        outs = [p.communicate(timeout=300) for p in nodes]
    finally:
        stop_torchrun(nodes)
    assert all(p.returncode == 0 for p in nodes), "".join(o[1] for o in outs)[-3000:]
    losses = losses_by_iteration(one_node)
    assert sorted(losses) == [8, 12, 20, 24] and losses_by_iteration(two_nodes) == losses  # logged every 8 steps
    a, b = (torch.load(d / "trunk_resnet18.pth", weights_only=True) for d in (one_node, two_nodes))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
