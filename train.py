"""SwAV pretraining, the one entry point.

    python train.py --preset demo_cpu --data_path data/demo/digits/train
    torchrun --nproc_per_node=4 train.py --preset bs256_200ep --data_path /data/imagenet/train

Reads top to bottom: setup, data, model, optimiser, resume, the epoch loop, export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import pipelines
from pipelines.spec import DataWarning, MultiCropSpec
from swav_fast import checkpoint as ckpt
from swav_fast import guards, interop
from swav_fast.config import ConfigError, parse_config, per_invocation, to_toml, trimmed_queue_length
from swav_fast.distributed import (
    DeviceError,
    DistInfo,
    agree_any,
    first_disagreement,
    gather_objects,
    init_distributed,
    run_main,
    shutdown,
    syncbn_group,
    world_size_from_env,
    wrap_for_step_mode,
)
from swav_fast.guards import CollapseMonitor
from swav_fast.model import SwAVModel
from swav_fast.optim import LARS, lr_schedule
from swav_fast.queue import EmbeddingQueue, redistribute
from swav_fast.step import GraphStep, compiled_step_core, step_autocast, train_step
from swav_fast.syncbn import convert_sync_batchnorm


def git_revision() -> str:
    try:
        here = Path(__file__).parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gather_queue(queue: EmbeddingQueue | None, info: DistInfo) -> dict | None:
    """Every rank's queue, so one checkpoint file holds the whole run state."""
    if queue is None:
        return None
    buffers = [queue.buffer]
    if info.world_size > 1:
        buffers = [torch.empty_like(queue.buffer) for _ in range(info.world_size)]
        dist.all_gather(buffers, queue.buffer)
    return {"buffers": [b.cpu() for b in buffers], "n_pushed": queue.n_pushed}


def device_config_problem(cfg, on_cuda: bool) -> str | None:
    """What in the config the device cannot run (a one-line message), or None."""
    if cfg.sinkhorn_impl == "triton" and not on_cuda:
        return "--sinkhorn_impl triton needs CUDA; use the reference on CPU"
    if cfg.step_mode == "graph" and not on_cuda:
        return "--step_mode graph captures the step as a CUDA graph and needs CUDA; use eager or compile on CPU"
    return None


MODEL_OPTIONS = ("arch", "hidden_mlp", "feat_dim", "nmb_prototypes")


def resume_mismatch(saved: dict, cfg, path, error: Exception) -> str:
    """Why a checkpoint's weights do not load into this run's model, naming the options that differ."""
    differ = [f"--{k} {saved[k]} (this run: {getattr(cfg, k)})" for k in MODEL_OPTIONS
              if k in saved and saved[k] != getattr(cfg, k)]
    why = (f"it was made with {', '.join(differ)}" if differ
           else f"its weights do not fit this model ({str(error).splitlines()[0]})")
    return (f"[bold red]resume error:[/] {path} does not load into this run's model: {why}. Leave those options "
            "out (--resume auto with no --preset takes the run's config.toml) or give the checkpoint's values")


def changed_options(saved: dict, cfg) -> dict[str, tuple]:
    """{option: (the checkpoint run's value, this run's)} for every option that differs (per-invocation options and
    --run_dir left out)."""
    return {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items()
            if k in saved and saved[k] != v and k != "run_dir" and not per_invocation(k)}


SCHEDULE_OPTIONS = ("epochs", "base_lr", "final_lr", "warmup_epochs", "start_warmup")


def write_run_info(path: Path, record: dict) -> None:
    """run_info.json: this launch, with the earlier launches of the run kept under "earlier_launches"."""
    earlier: list = []
    with contextlib.suppress(OSError, ValueError, AttributeError):
        old = json.loads(path.read_text())
        earlier = old.pop("earlier_launches", []) + [old]
    ckpt.write_atomic(json.dumps({**record, "earlier_launches": earlier}, indent=1).encode(), path)


SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def split_named_classes(data_path: str) -> list[str]:
    """The class folders of an ImageFolder named like dataset splits, when both a training and a held-out split are
    among them (`--data_path` given the dataset's root instead of its train folder); [] otherwise."""
    root = Path(data_path)
    if not root.is_dir():
        return []
    with contextlib.suppress(OSError):
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_NAMES)
        lowered = {n.lower() for n in names}
        if "train" in lowered and lowered - {"train"}:
            return names
    return []


def brief_data_warnings(format_warning):
    """warnings.formatwarning that prints a DataWarning (an unreadable image replaced) as one plain line, without
    the file and source line of the loop that met it; every other warning as `format_warning` does."""

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, DataWarning):
            return f"warning: {message}\n"
        return format_warning(message, category, filename, lineno, line)

    return formatwarning


def oom_reason(e: torch.OutOfMemoryError) -> str:
    """The first line of an out-of-memory error (CUDA's goes on with allocator statistics), or its type."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        with contextlib.ExitStack() as held:  # the run directory's lock, released however the run ends
            return _main(argv, held)
    except torch.OutOfMemoryError as e:
        # The training loop reports its own (with the iteration, exit code 5 as here). This one came before it:
        # building the model or the data pipeline, loading a checkpoint, DDP's first broadcast. The usual cause is
        # a GPU that another process holds.
        rank = f" on rank {os.environ['RANK']}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        held = ""
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):  # a CUDA context that cannot even answer this
                free, total = torch.cuda.mem_get_info()
                held = (f" The GPU has {free / 2**30:.1f} of {total / 2**30:.1f} GiB free: if another process holds "
                        "it (nvidia-smi lists them), wait for it or choose another GPU (CUDA_VISIBLE_DEVICES).")
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]stopped:[/] out of memory{rank} before training started: "
            f"{oom_reason(e)}.{held}", highlight=False)
        return 5


def _main(argv: list[str] | None, held: contextlib.ExitStack) -> int:
    console = Console(stderr=True, soft_wrap=True)
    # ============================== setup ==============================
    try:
        cfg = parse_config(argv, world_size_from_env())
        info = init_distributed(cfg.device, cfg.dist_timeout_minutes)
    except (ConfigError, DeviceError) as e:  # before any process group: each process says it
        console.print(f"[bold red]config error:[/] {e}", highlight=False)
        return 2
    log = console.print if info.is_main else (lambda *a, **k: None)
    on_cuda = info.device.type == "cuda"
    if on_cuda:
        # as the official main_swav.py: cuDNN times its algorithms for each shape in the first steps (in graph mode
        # the warm-up steps, before the capture) and keeps the fastest
        torch.backends.cudnn.benchmark = True
    run_dir = Path(cfg.run_dir)
    if info.world_size > 1:
        # Each rank reads its files itself (the run directory's newest checkpoint and, for --resume auto, its
        # config.toml; the data, --resume and --init_from files): where some nodes do not see the same files, the
        # ranks would start from different states, or some would stop while the others wait for them in a
        # collective. They compare what they found first.
        newest = ckpt.list_checkpoints(run_dir)
        differ = first_disagreement(gather_objects({
            "newest checkpoint": ckpt.describe(newest[-1]) if newest else None,
            "--data_path exists": Path(cfg.data_path).exists(),
            "--resume file exists": Path(cfg.resume).is_file() if cfg.resume not in ("", "auto") else None,
            "--init_from file exists": Path(cfg.init_from).is_file() if cfg.init_from else None,
            "configuration": dataclasses.asdict(cfg)}, info))
        if differ:
            log(f"[bold red]error:[/] the ranks see different runs ({differ}). --run_dir must be one directory on a "
                "filesystem that every node sees, and every node must run the same command", highlight=False)
            shutdown()
            return 2
    problem = device_config_problem(cfg, on_cuda)
    if problem:
        log(f"[bold red]config error:[/] {problem}", highlight=False)
        shutdown()
        return 2
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).is_file():
        log(f"[bold red]error:[/] --resume {cfg.resume}: no such checkpoint file", highlight=False)
        shutdown()
        return 2
    fresh = cfg.resume in ("", "auto") and not ckpt.list_checkpoints(run_dir)
    if not cfg.resume and not fresh:
        log(f"[bold red]error:[/] {run_dir} already holds checkpoints of a run: pass --resume auto to continue it, "
            "or choose another --run_dir", highlight=False)
        shutdown()
        return 2

    def stop_together(message: str | None) -> bool:
        """Whether any rank failed a setup step (`message`, on the ranks where it failed; None elsewhere), agreed
        by every rank, so that none waits in a collective for a rank that has stopped (NCCL would wait for its
        10-minute watchdog). Each failing rank says why (another rank's message carries its number); rank 0 says
        so when only another rank failed."""
        failed = agree_any([message is not None], info)[0]
        if message is not None:
            console.print(("" if info.is_main else f"rank {info.rank}: ") + message, highlight=False)
        elif failed:
            log("[bold red]stopped:[/] another rank failed to set up (its message above or in its log)",
                highlight=False)
        return failed

    def unwritable_message(error: OSError) -> str:
        return (f"[bold red]error:[/] cannot write in --run_dir {run_dir} ({type(error).__name__}: {error}); choose "
                "a directory this user can write, with free space")

    def run_dir_unwritable(error: OSError | None) -> bool:
        """Whether rank 0 failed to write in the run directory (`error`, None elsewhere), agreed by every rank."""
        return stop_together(None if error is None else unwritable_message(error))

    # The run directory is made and locked here; config.toml and run_info.json are written once setup has
    # succeeded (below the resume), so a start that fails (a typo in --data_path, a model option the checkpoint
    # does not fit) leaves the run's records as they were and `--resume auto` still works.
    # A start that fails before then leaves no trace: the lock file and the folders this launch made are removed
    # when nothing else is in them.
    problem, setup_done = None, False

    def release_run_dir(lock: IO[str] | None, made: list[Path], lock_was_there: bool) -> None:
        if not setup_done and not lock_was_there:
            with contextlib.suppress(OSError):  # removed while still locked: a second launch waits or is refused
                if [p.name for p in run_dir.iterdir()] == [ckpt.LOCK_FILE]:
                    (run_dir / ckpt.LOCK_FILE).unlink()
                    for folder in made:  # deepest first
                        folder.rmdir()
        if lock is not None:
            lock.close()

    if info.is_main:
        if run_dir.exists() and not run_dir.is_dir():
            problem = f"[bold red]error:[/] --run_dir {run_dir} is a file, not a directory; choose another --run_dir"
        else:
            try:
                made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
                lock_was_there = (run_dir / ckpt.LOCK_FILE).exists()
                run_dir.mkdir(parents=True, exist_ok=True)
                lock = ckpt.lock_run_dir(run_dir)  # rank 0 speaks for the run
                held.callback(release_run_dir, lock, made, lock_was_there)
            except ckpt.RunDirBusy as e:
                problem = (f"[bold red]error:[/] another train.py is using --run_dir {run_dir} ({e}); wait for it to "
                           "end, or choose another --run_dir")
            except OSError as e:  # permissions, a full disk
                problem = unwritable_message(e)
    if stop_together(problem):
        shutdown()
        return 2
    torch.manual_seed(cfg.seed)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_cuda)
    autocast = step_autocast(info.device.type) if use_bf16 else contextlib.nullcontext()
    # Make the first collective use the right device under NCCL before anything else talks.
    if info.world_size > 1:
        dist.barrier()

    # ============================== data ==============================
    spec = MultiCropSpec.from_config(cfg)
    problem = None
    try:
        loader = pipelines.build(spec, cfg, info.device, info.rank, info.world_size)
    except (ValueError, FileNotFoundError, ImportError) as e:
        problem = f"[bold red]data error:[/] {e}"
    if stop_together(problem):
        shutdown()
        return 2
    steps_per_epoch = len(loader)
    log(f"data: {loader.num_samples} images in {cfg.data_path} ({cfg.pipeline} pipeline), {info.world_size} "
        f"rank(s) x {cfg.batch_size} images x {spec.n_crops} crops {spec.crop_sizes}, {steps_per_epoch} steps per "
        "epoch", highlight=False)
    split_folders = split_named_classes(cfg.data_path)
    if split_folders:
        log(f"note: --data_path {cfg.data_path} has class folders named {' and '.join(split_folders)}: if those are "
            "a dataset's splits, this run trains on all of them; pass the training split's folder instead",
            highlight=False)

    # ============================== model ==============================
    model = SwAVModel(cfg.arch, cfg.hidden_mlp, cfg.feat_dim, cfg.nmb_prototypes)
    if info.world_size > 1 and cfg.sync_bn:
        if on_cuda:
            # swav_fast.syncbn: no host sync per layer
            model = convert_sync_batchnorm(model, syncbn_group(info, cfg.sync_bn_group_size))
        else:
            log("note: SyncBatchNorm needs CUDA; on CPU every rank normalises with its own batch statistics "
                "(plain BatchNorm)")
    if cfg.init_from and fresh:  # the same on every rank (compared at the start)
        problem = None
        try:
            weights, kind = interop.read_checkpoint(cfg.init_from)
            report = interop.load_into_swav_model(weights, model, strict_head=False, source=cfg.init_from)
        except (interop.InteropError, OSError) as e:
            problem = f"[bold red]--init_from error:[/] {e}"
        if stop_together(problem):
            shutdown()
            return 2
        log(f"initialised from {cfg.init_from} ({kind}): {report.summary()}", highlight=False)
    model = model.to(info.device)
    # channels_last is the fast layout for cuDNN with bf16; on CPU it measured 2x slower here, so the
    # channels_last crops the pipelines hand over are made contiguous instead (one cheap copy per step).
    channels_last = cfg.channels_last and on_cuda
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fresh:
        # the exact starting point, for "before vs after" evaluations (tools/knn_eval.py --baseline)
        unwritable = None
        if info.is_main:
            try:
                ckpt.export_trunk(model.state_dict(), run_dir / f"trunk_init_{cfg.arch}.pth")
            except OSError as e:  # tens of MB, where config.toml's few KB still fitted
                unwritable = e
        if run_dir_unwritable(unwritable):
            shutdown()
            return 2
    core = model
    # eager: DDP; compile, graph: the step all-reduces the gradients itself, so that it stays one graph
    model, grad_group = wrap_for_step_mode(model, cfg.step_mode, info)

    step_core = (compiled_step_core() if cfg.step_mode == "compile" else GraphStep() if cfg.step_mode == "graph"
                 else None)
    graph_step = step_core if cfg.step_mode == "graph" else None  # closed before leaving the group

    # ============================== optimiser ==============================
    optimizer = LARS(model.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                     trust_coefficient=cfg.lars_trust)
    lrs = lr_schedule(cfg.base_lr, cfg.final_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.start_warmup)
    queue_total = trimmed_queue_length(cfg, info.world_size)
    global_batch = cfg.batch_size * info.world_size
    if cfg.queue_length and queue_total != cfg.queue_length:
        log(f"queue_length {cfg.queue_length} trimmed to {queue_total}, a multiple of the global batch")

    # ============================== resume ==============================
    start_epoch, start_step, iteration, queue, epoch_loss_sum = 0, 0, 0, None, 0.0
    state, problem, resume_from = None, None, None
    try:
        if cfg.resume == "auto":
            found = ckpt.load_latest(run_dir, warn=lambda m: log(f"[yellow]{m}[/]", highlight=False))
            resume_from, state = found if found else (None, None)
        elif cfg.resume:
            resume_from, state = Path(cfg.resume), ckpt.load(cfg.resume)
    except ckpt.CheckpointError as e:
        problem = f"[bold red]resume error:[/] {e}"
    if stop_together(problem):
        shutdown(model)
        return 2
    if info.world_size > 1:
        # the newest checkpoint was compared at the start, but a rank skips one that fails its checks there (a
        # partly copied file on one node's view of the filesystem) and takes an older one
        differ = first_disagreement(gather_objects({"checkpoint resumed from": str(resume_from)}, info))
        if differ:
            log(f"[bold red]resume error:[/] the ranks would resume from different checkpoints ({differ}); every "
                "node must see the same, complete files in --run_dir", highlight=False)
            shutdown(model)
            return 2
    if state is not None and cfg.resume != "auto":
        # --resume PATH into a run directory whose own checkpoints have gone further: the two histories would
        # interleave there (and --resume auto would later take the newest, of the other one)
        own = ckpt.checkpoint_path(run_dir, state["iteration"]).name
        later = [p.name for p in ckpt.list_checkpoints(run_dir) if p.name > own]
        problem = (f"[bold red]resume error:[/] {run_dir} holds checkpoints past iteration {state['iteration']} of "
                   f"{resume_from} (the newest: {later[-1]}); continuing there would mix two runs' checkpoints and "
                   "metrics. Pass another --run_dir, or move those checkpoints out of "
                   f"{run_dir / ckpt.CHECKPOINT_DIR} to roll the run back" if later else None)
        if stop_together(problem):
            shutdown(model)
            return 2
    if state is not None:
        problem = None
        try:
            core.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # torch's size mismatch / missing keys, a group count
            problem = resume_mismatch(state["config"], cfg, resume_from, e)
        if stop_together(problem):
            shutdown(model)
            return 2
        changed = changed_options(state["config"], cfg)
        if changed:
            log("options changed since the checkpoint: "
                + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()), highlight=False)
        start_epoch, start_step, iteration = state["epoch"], state["step_in_epoch"], state["iteration"]
        epoch_loss_sum = state["epoch_loss_sum"]
        saved_batch = state["config"]["batch_size"] * state["world_size"]
        if start_step and saved_batch != global_batch:
            # another global batch (rank count or batch size): the same place in the epoch's sample order, which
            # is the same permutation for any rank count (DistributedSampler's; --ffcv_order quasi_random deals
            # pages to ranks, so there it is the same fraction of the epoch), in whole new batches, rounded down
            mapped = start_step * saved_batch // global_batch
            log(f"the checkpoint is {start_step * saved_batch} images into epoch {start_epoch + 1} with a global "
                f"batch of {saved_batch}; with {global_batch} this run goes on from step {mapped}", highlight=False)
            epoch_loss_sum *= mapped / start_step  # keeps the epoch's mean loss so far
            start_step = mapped
        if start_step >= steps_per_epoch:  # the epoch length changed (data, ranks or batch): start the next one
            start_epoch, start_step, epoch_loss_sum = start_epoch + 1, 0, 0.0
        if state["rng"] and len(state["rng"]) == info.world_size:
            ckpt.set_rng_state(state["rng"][info.rank])
        saved_q = state["queue"]
        if saved_q is not None:
            buffers, n_assign, dim = saved_q["buffers"], len(cfg.crops_for_assign), cfg.feat_dim
            length = queue_total // info.world_size
            if length == 0:
                log("note: this run has no queue (queue_length 0); the checkpoint's queue is not used")
            elif buffers[0].shape[0] != n_assign or buffers[0].shape[2] != dim:
                log(f"note: the checkpoint's queue ({buffers[0].shape[0]} assignment crops x {buffers[0].shape[2]} "
                    f"dims) does not fit this run ({n_assign} x {dim}); starting without it", highlight=False)
            else:
                queue = EmbeddingQueue(n_assign, length, dim, cfg.batch_size, info.device)
                if (len(buffers) == info.world_size and buffers[0].shape[1] == length
                        and state["config"]["batch_size"] == cfg.batch_size):  # n_pushed counts batches of it
                    queue.load_state_dict({"buffer": buffers[info.rank], "n_pushed": saved_q["n_pushed"]})
                else:  # another rank count, batch size or queue length: the saved rows, dealt out again
                    buffer, n_pushed = redistribute(buffers, saved_q["n_pushed"], state["config"]["batch_size"],
                                                    info.rank, info.world_size, length, cfg.batch_size)
                    queue.load_state_dict({"buffer": buffer, "n_pushed": n_pushed})
                    log(f"queue: the checkpoint's {len(buffers)} rank(s) x {buffers[0].shape[1]} rows redistributed "
                        f"over {info.world_size} rank(s) x {length} rows, "
                        + ("in use" if queue.in_use else f"in use after {length // cfg.batch_size - n_pushed} more "
                           "steps"), highlight=False)
        log(f"resumed from {resume_from}: epoch {start_epoch + 1}, step {start_step}, iteration {iteration}",
            highlight=False)
        position = start_epoch * steps_per_epoch + start_step
        if position < len(lrs) and changed.keys() & set(SCHEDULE_OPTIONS):
            # e.g. a finished run extended with more --epochs: the cosine is drawn again over the new length
            log(f"the learning-rate schedule follows the new options: lr {lrs[position]:.4g} at this step",
                highlight=False)
        if start_epoch >= cfg.epochs:
            log(f"the run in {run_dir} has finished all {cfg.epochs} epochs; nothing to train")
        del state
    elif cfg.resume == "auto":
        log(f"no checkpoint in {run_dir}: a new run", highlight=False)

    # Setup has succeeded: the run's records (see the run directory's lock above).
    setup_done = True
    unwritable = None
    if info.is_main:
        try:
            ckpt.write_atomic(to_toml(cfg).encode(), run_dir / "config.toml")
            write_run_info(run_dir / "run_info.json", {
                "git_revision": git_revision(), "world_size": info.world_size, "device": str(info.device),
                "torch": torch.__version__, "argv": sys.argv if argv is None else argv,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            open(run_dir / "metrics.jsonl", "a").close()  # opened again for the training below
        except OSError as e:  # a full disk, a quota
            unwritable = e
    if run_dir_unwritable(unwritable):
        shutdown(model)
        return 2
    if cfg.step_mode == "compile":
        log("--step_mode compile: the first step compiles the whole step (minutes on a large model), and so do the "
            "first steps after the freeze window and after the queue starts", highlight=False)

    # SIGTERM (torchrun shutdown, SLURM --signal=TERM@120), SIGUSR1 (torchrun forwards it only when told to with
    # --signals_to_handle), SIGHUP (the terminal hung up: an ssh connection dropped; torchrun forwards it) and
    # Ctrl-C (SIGINT): finish the step, checkpoint, leave. A SIGHUP that is ignored when the run starts (nohup)
    # stays ignored. A second Ctrl-C leaves at once, without a checkpoint; one within a second of the first is
    # taken for the same keypress (a process can get the terminal's SIGINT and a launcher's forwarded copy of it).
    # DataLoader workers forked later inherit the handler, so a hang-up sent to the whole job does not kill them.
    stop_signal: list[int] = []
    first_sigint: list[float] = []

    def on_signal(signum: int, frame) -> None:  # noqa: ARG001 - the handler signature
        if signum == signal.SIGINT:
            if first_sigint and time.monotonic() - first_sigint[0] > 1.0:
                raise KeyboardInterrupt
            if first_sigint:
                return
            first_sigint.append(time.monotonic())
        stop_signal.append(signum)
        if signum == signal.SIGINT and info.is_main:  # os.write: safe inside a signal handler, unlike the console
            with contextlib.suppress(OSError):  # a `| tee` the same Ctrl-C ended: the message has nowhere to go
                os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop now, "
                         b"without one)\n")

    handled = [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        handled.append(signal.SIGHUP)
    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in handled}

    def restore_signal_handlers() -> None:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    def save(epoch: int, step_in_epoch: int, keep_for_good: bool = False) -> Path | None:
        """Every rank takes part in the gathers; rank 0 writes; then the ranks agree on whether it could. A failed
        write (a full disk, a quota) stops every rank at once: were rank 0 to stop alone, the others would wait for
        it in the next collective until a timeout."""
        queue_state, rng_states = gather_queue(queue, info), gather_objects(ckpt.rng_state(), info)
        path, error = None, None
        if info.is_main:
            try:
                path = ckpt.save_checkpoint({
                    "format": ckpt.FORMAT, "epoch": epoch, "step_in_epoch": step_in_epoch, "iteration": iteration,
                    "epoch_loss_sum": epoch_loss_sum, "model": core.state_dict(),
                    "optimizer": optimizer.state_dict(), "queue": queue_state, "rng": rng_states,
                    "config": dataclasses.asdict(cfg), "world_size": info.world_size,
                }, run_dir, cfg.keep_checkpoints, ckpt.kept_checkpoint_path(run_dir, epoch) if keep_for_good else None)
            except Exception as e:  # noqa: BLE001 - told to every rank first, then raised as what it is
                error = e
        if agree_any([error is not None], info)[0]:
            if error is not None and not isinstance(error, OSError):
                raise error  # not the disk: a bug, with its traceback (the other ranks stop with exit code 4)
            raise ckpt.CheckpointWriteError(f"{type(error).__name__}: {error}" if error else "failed on rank 0")
        return path

    # ============================== training ==============================
    metrics = open(run_dir / "metrics.jsonl", "a") if info.is_main else None
    metrics_failed: list[OSError] = []

    def write_metrics(row: dict) -> None:
        """One JSON line into metrics.jsonl (rank 0). A failed write (a full disk) is said once and the run goes
        on without metrics: rank 0 must not leave the others waiting, and the next checkpoint's write, which
        would fail the same way, stops every rank with the reason (see save)."""
        if metrics and not metrics_failed:
            try:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            except OSError as e:
                metrics_failed.append(e)
                log(f"[bold yellow]warning:[/] could not write {run_dir / 'metrics.jsonl'} ({e}); the run goes on "
                    "without it", highlight=False)

    resume_hint = (f"continue with: python train.py --run_dir {run_dir} --resume auto" if info.world_size == 1 else
                   f"continue with the same torchrun launch of: train.py --run_dir {run_dir} --resume auto")

    def last_checkpoint() -> Path | str:
        kept = ckpt.list_checkpoints(run_dir)
        return kept[-1] if kept else "(none yet: --resume auto will start from the beginning)"

    ln_k = math.log(cfg.nmb_prototypes)
    collapse = CollapseMonitor(ln_k, cfg.collapse_margin, cfg.collapse_window, cfg.freeze_prototypes_niters)
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} (ln K {task.fields[lnk]:.3f})"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[sps]} samples/s"), TimeRemainingColumn(), console=console,
        disable=not info.is_main,
    )
    last_epoch = cfg.stop_after_epoch or cfg.epochs
    # Per-step losses stay on the device; every log_every steps they are copied to the host without waiting and
    # read one window later (guards.LossLog), or at once before a checkpoint and at the end of an epoch.
    losses = guards.LossLog(cfg.log_every, info.device)
    last_ckpt_time, stop_now, trained = time.monotonic(), False, False
    first_step_s = None  # the wall time of this launch's first step (compiling, warming up, the loader's start)
    # torch.compile specialises the step on the queue's existence, the queue's use and the freeze window, so in
    # compile mode the step where one of them changes compiles again (minutes on a GPU): such steps are left out
    # of the rates and the ETA, as the first step is: the clocks they start from move on by such a step's time
    last_phase = None
    # A non-finite loss is kept here until the ranks agree (each checks only its own losses, and one rank may see
    # it a window before the others); then every rank stops together, none left waiting in a collective.
    non_finite: list[guards.NonFiniteLoss] = []

    def stop_if_non_finite(agreed: bool) -> None:
        if agreed:
            raise non_finite[0] if non_finite else guards.NonFiniteLoss(
                f"another rank's loss is not finite (by iteration {iteration}; this rank's losses were finite)")

    def report(values: list[float], w: dict) -> None:
        """Check, log and record one window of per-step losses (w: what the loop knew when the window closed)."""
        nonlocal epoch_loss_sum
        first = w["iteration"] - len(values)
        if non_finite:
            return
        try:
            guards.first_non_finite(values, first)
        except guards.NonFiniteLoss as e:
            non_finite.append(e)
            return
        epoch_loss_sum += sum(values)
        warning = collapse.update(values, first)
        if warning:
            log(f"[bold yellow]warning:[/] {warning}", highlight=False)
            write_metrics({"event": "collapse_warning", "iteration": w["iteration"], "message": warning})
        mean = sum(values) / len(values)
        sps, eta = w["sps"], w["eta"]  # None in a window of steps left out of the rates alone
        progress.update(w["task"], loss=f"{mean:.4f}", lr=f"{w['lr']:.4g}", sps="-" if sps is None else f"{sps:.0f}")
        write_metrics({"epoch": w["epoch"], "iteration": w["iteration"], "loss": mean, "loss_last": values[-1],
                       "lr": w["lr"], **({} if sps is None else {"samples_per_s": round(sps, 2)})})
        if not console.is_terminal:  # logs and CI: plain lines instead of the live bar
            log(f"epoch {w['epoch'] + 1} step {w['step']}/{steps_per_epoch} loss {mean:.4f} (ln K {ln_k:.3f}) "
                f"lr {w['lr']:.4g}" + ("" if sps is None else f" {sps:.0f} samples/s")
                + ("" if eta is None else f", ETA {eta / 60:.1f} min"), highlight=False)

    def close_window(epoch: int, step: int, task, lr: float, flush: bool) -> None:
        """End the loss window at `step` (0-based, just run); report the windows whose values reached the host."""
        nonlocal t_log, n_log
        window = None
        if len(losses):
            # host clock: between two windows it measures how fast steps are queued, which the bounded queues
            # (data staging, the wait for the window before) tie to the device's pace. Rates and ETA leave out
            # this launch's first step (torch.compile, cuDNN's benchmarks, the loader's first batch).
            now = time.perf_counter()
            sps = n_log * global_batch / (now - t_log) if n_log else None
            t_log, n_log = now, 0
            timed = step + 1 - timed_from - len(recompiled)
            eta = (now - t_rate) / timed * (steps_per_epoch * (last_epoch - epoch) - step - 1) if timed else None
            window = {"epoch": epoch, "step": step + 1, "iteration": iteration, "lr": lr, "sps": sps, "eta": eta,
                      "task": task}
        for values, w in losses.close_window(window, flush=flush):
            report(values, w)

    try:
        with progress:
            for epoch in range(start_epoch, last_epoch):
                first_step = start_step if epoch == start_epoch else 0
                if first_step == 0:
                    epoch_loss_sum = 0.0
                loader.set_epoch(epoch, first_step)
                if cfg.queue_length > 0 and epoch >= cfg.epoch_queue_starts and queue is None:
                    queue = EmbeddingQueue(len(cfg.crops_for_assign), queue_total // info.world_size, cfg.feat_dim,
                                           cfg.batch_size, info.device)
                task = progress.add_task("train", total=steps_per_epoch, completed=first_step, loss="-", lnk=ln_k,
                                         lr="-", sps="-", epoch=f"{epoch + 1}/{cfg.epochs}")
                model.train()
                t_epoch = t_log = t_rate = time.perf_counter()
                n_log = skipped = 0
                timed_from = first_step  # the first step the rates count
                recompiled: list[float] = []  # the seconds of this epoch's recompiling steps (compile mode)
                for step, batch in enumerate(loader, start=first_step):
                    # the schedule's iteration, as the official loop counts it (epoch * len(loader) + step); equal to
                    # `iteration` (the run's step counter, which names the checkpoints) unless a resume changed the
                    # number of steps per epoch
                    position = epoch * steps_per_epoch + step
                    lr = float(lrs[position])
                    phase = (queue is not None, queue is not None and queue.in_use,
                             position < cfg.freeze_prototypes_niters)
                    recompiles = cfg.step_mode == "compile" and last_phase is not None and phase != last_phase
                    last_phase = phase
                    t_step = time.perf_counter()
                    crops = batch.crops if channels_last else [c.contiguous() for c in batch.crops]
                    loss = train_step(model, optimizer, crops, lr, position, cfg, queue, info.group, autocast,
                                      step_core, grad_group)
                    losses.add(loss)
                    iteration += 1
                    if first_step_s is None:  # this launch's first step: timed alone, not in the rates
                        t_log = t_rate = time.perf_counter()
                        first_step_s, timed_from = t_rate - t_epoch, step + 1
                    elif recompiles:
                        recompiled.append(time.perf_counter() - t_step)
                        t_log += recompiled[-1]
                        t_rate += recompiled[-1]
                    else:
                        n_log += 1
                    skipped += len(batch.skipped)
                    epoch_end = step + 1 == steps_per_epoch
                    progress.update(task, completed=step + 1)
                    timed = False
                    if losses.full or epoch_end or (info.world_size == 1 and stop_signal):
                        close_window(epoch, step, task, lr, flush=epoch_end)
                        timed = cfg.checkpoint_every_minutes > 0 and (
                            time.monotonic() - last_ckpt_time) / 60 >= cfg.checkpoint_every_minutes
                        stop_now, timed, bad = agree_any([bool(stop_signal), timed, bool(non_finite)], info)
                        stop_if_non_finite(bad)
                    by_steps = cfg.checkpoint_every_steps > 0 and iteration % cfg.checkpoint_every_steps == 0
                    if not epoch_end and (timed or by_steps or stop_now):
                        # never checkpoint a state whose losses were not checked: wait for them now
                        close_window(epoch, step, task, lr, flush=True)
                        stop_if_non_finite(agree_any([bool(non_finite)], info)[0])
                        path = save(epoch, step + 1)
                        last_ckpt_time = time.monotonic()
                        if path:
                            write_metrics({"event": "checkpoint", "iteration": iteration, "path": str(path)})
                    if stop_now:
                        break
                progress.remove_task(task)
                if stop_now and not epoch_end:
                    break
                epoch_end_time = time.perf_counter()
                epoch_time = epoch_end_time - t_epoch
                n_timed = steps_per_epoch - timed_from - len(recompiled)
                rate = n_timed * global_batch / (epoch_end_time - t_rate) if n_timed > 0 else None
                mean_loss = epoch_loss_sum / max(1, steps_per_epoch)
                if info.world_size > 1:  # unreadable images replaced this epoch, all ranks
                    n = torch.tensor(skipped, device=info.device)
                    dist.all_reduce(n)
                    skipped = int(n.item())
                save(epoch + 1, 0, cfg.checkpoint_freq > 0 and ((epoch + 1) % cfg.checkpoint_freq == 0
                                                                 or epoch + 1 == cfg.epochs))
                last_ckpt_time = time.monotonic()
                write_metrics({"event": "epoch", "epoch": epoch, "loss": mean_loss, "ln_k": ln_k,
                               "epoch_time_s": round(epoch_time, 2), "iteration": iteration,
                               "queue_in_use": bool(queue is not None and queue.in_use), "skipped_images": skipped})
                log(f"epoch {epoch + 1}/{cfg.epochs}: mean loss {mean_loss:.4f} (ln K = {ln_k:.3f}), "
                    f"{epoch_time:.1f} s" + ("" if rate is None else f", {rate:.0f} samples/s")
                    + (f" after the first step (which took {first_step_s:.1f} s)"
                       if rate is not None and timed_from > first_step else "")
                    + (f", leaving out {len(recompiled)} step(s) that compiled the step again for a new phase "
                       f"({sum(recompiled):.1f} s)" if rate is not None and recompiled else "")
                    + (", queue in use" if queue is not None and queue.in_use else "")
                    + (f", [yellow]{skipped} unreadable image(s) replaced (see the warnings)[/]" if skipped else ""),
                    highlight=False)
                if stop_now:
                    break
        trained = True
    except guards.NonFiniteLoss as e:
        log(f"[bold red]stopped:[/] {e}. Nothing was saved after it; the last good checkpoint is "
            f"{last_checkpoint()}. Common causes: too high a learning rate (scale --base_lr with the global batch), "
            "too short a --freeze_prototypes_niters, bad input data", highlight=False)
        write_metrics({"event": "non_finite_loss", "iteration": iteration, "message": str(e)})
        shutdown(model, graph_step)
        return 3
    except ckpt.CheckpointWriteError as e:
        log(f"[bold red]stopped:[/] could not write the checkpoint of iteration {iteration} in "
            f"{run_dir / ckpt.CHECKPOINT_DIR} ({e}). The last good checkpoint is {last_checkpoint()}; make room (or "
            f"fix the permissions), then {resume_hint}", highlight=False)
        write_metrics({"event": "checkpoint_failed", "iteration": iteration, "message": str(e)})
        shutdown(model, graph_step)
        return 4
    except torch.OutOfMemoryError as e:  # torch.cuda.OutOfMemoryError; no shutdown, as for KeyboardInterrupt
        # said by the rank that ran out (possibly not rank 0), with what a user can change
        peak = f", {torch.cuda.max_memory_allocated(info.device) / 2**30:.1f} GiB at the peak" if on_cuda else ""
        console.print(
            f"[bold red]stopped:[/] out of memory{f' on rank {info.rank}' if info.world_size > 1 else ''} at "
            f"iteration {iteration} ({cfg.batch_size} images x {sum(cfg.nmb_crops)} crops per rank, --step_mode "
            f"{cfg.step_mode}{peak}): {oom_reason(e)}. To train the same "
            "recipe with less memory per GPU, spread its global batch over more GPUs (a smaller --batch_size "
            "each); a captured graph (--step_mode graph) keeps a memory pool of its own, --step_mode eager does "
            "not; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True helps when free memory is fragmented. The last "
            f"checkpoint is {last_checkpoint()}.", highlight=False)
        write_metrics({"event": "out_of_memory", "iteration": iteration, "message": str(e)})
        return 5
    except KeyboardInterrupt:  # no shutdown: the other ranks may be inside a collective this rank never joins
        log(f"[bold red]interrupted[/] at iteration {iteration}, without a checkpoint; the last one is "
            f"{last_checkpoint()}; {resume_hint}", highlight=False)
        write_metrics({"event": "interrupted", "iteration": iteration})
        return 130
    finally:
        # leaving on a signal with a checkpoint: keep the handlers to the end, a second signal (a hang-up often
        # comes twice) must not cut the export or the shutdown short
        if not (trained and stop_now):
            restore_signal_handlers()

    # ============================== export ==============================
    status = 0
    if info.is_main:
        by = signal.Signals(stop_signal[0]).name if stop_signal else "(on another rank)"
        if stop_now:
            write_metrics({"event": "stopped_by_signal", "iteration": iteration, "signal": by})
        for stream, error in guards.lost_output():  # the terminal or pipe went away; the run went on
            write_metrics({"event": "output_lost", "stream": stream, "error": error})
        with contextlib.suppress(OSError):  # lines a full disk refused are still in the buffer
            metrics.close()
        finished = not stop_now and last_epoch >= cfg.epochs
        if finished:
            out = run_dir / f"trunk_{cfg.arch}.pth"
            try:
                ckpt.export_trunk(core.state_dict(), out)
                log(f"exported the trunk to {out} (loads into torchvision.models.{cfg.arch}(); fc.* is not "
                    "included)", highlight=False)
            except OSError as e:  # the last checkpoint holds the weights; resuming the finished run exports them
                log(f"[bold red]error:[/] could not write the trunk {out} ({type(e).__name__}: {e}). The last "
                    f"checkpoint holds the trained weights: make room, then {resume_hint} writes it",
                    highlight=False)
                status = 4
        try:  # plots are a convenience: a missing matplotlib or a plotting error must not fail the run
            from tools.plot_metrics import plot_run

            log(f"plots: {', '.join(str(p) for p in plot_run(run_dir))}", highlight=False)
        except Exception as e:  # noqa: BLE001
            log(f"note: no plots ({type(e).__name__}: {e}); python tools/plot_metrics.py {run_dir} makes them later",
                highlight=False)
        if stop_now:
            log(f"stopped by signal {by} with a checkpoint at "
                f"iteration {iteration}; {resume_hint}", highlight=False)
        elif not finished:
            log(f"stopped after epoch {last_epoch} of {cfg.epochs} as asked (--stop_after_epoch); {resume_hint}",
                highlight=False)
    shutdown(model, graph_step)
    restore_signal_handlers()
    return status


if __name__ == "__main__":
    guards.guard_output()
    warnings.formatwarning = brief_data_warnings(warnings.formatwarning)
    run_main(main)
