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
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import pipelines
from pipelines.spec import MultiCropSpec
from swav_fast import checkpoint as ckpt
from swav_fast.config import ConfigError, parse_config, to_toml, trimmed_queue_length
from swav_fast.distributed import DistInfo, init_distributed, shutdown, world_size_from_env
from swav_fast.model import SwAVModel
from swav_fast.optim import LARS, lr_schedule
from swav_fast.queue import EmbeddingQueue
from swav_fast.step import train_step


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


def gather_rng(info: DistInfo) -> list:
    states = [ckpt.rng_state()]
    if info.world_size > 1:
        states = [None] * info.world_size
        dist.all_gather_object(states, ckpt.rng_state())
    return states


def main(argv: list[str] | None = None) -> int:
    console = Console(stderr=True, soft_wrap=True)
    # ============================== setup ==============================
    try:
        cfg = parse_config(argv, world_size_from_env())
    except ConfigError as e:
        console.print(f"[bold red]config error:[/] {e}", highlight=False)
        return 2
    info = init_distributed(cfg.device)
    log = console.print if info.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run_dir)
    ckpt_path = run_dir / ckpt.CHECKPOINT_NAME
    if cfg.resume == "auto":
        resume_from = ckpt_path if ckpt_path.is_file() else None
    elif cfg.resume:
        resume_from = Path(cfg.resume)
        if not resume_from.is_file():
            log(f"[bold red]error:[/] --resume {cfg.resume}: no such checkpoint file")
            return 2
    else:
        resume_from = None
        if ckpt_path.is_file():
            log(f"[bold red]error:[/] {ckpt_path} already exists: pass --resume auto to continue that run, "
                "or choose another --run_dir", highlight=False)
            return 2
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
        (run_dir / "run_info.json").write_text(json.dumps({
            "git_revision": git_revision(), "world_size": info.world_size, "device": str(info.device),
            "torch": torch.__version__, "argv": sys.argv if argv is None else argv}, indent=1))
    torch.manual_seed(cfg.seed)
    on_cuda = info.device.type == "cuda"
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_cuda)
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    # Make the first collective use the right device under NCCL before anything else talks.
    if info.world_size > 1:
        dist.barrier()

    # ============================== data ==============================
    spec = MultiCropSpec.from_config(cfg)
    try:
        loader = pipelines.build(spec, cfg, info.device, info.rank, info.world_size)
    except ValueError as e:
        log(f"[bold red]data error:[/] {e}", highlight=False)
        return 2
    steps_per_epoch = len(loader)
    log(f"data: {len(loader.dataset)} images in {cfg.data_path}, {info.world_size} rank(s) x {cfg.batch_size} "
        f"images x {spec.n_crops} crops {spec.crop_sizes}, {steps_per_epoch} steps per epoch", highlight=False)

    # ============================== model ==============================
    model = SwAVModel(cfg.arch, cfg.hidden_mlp, cfg.feat_dim, cfg.nmb_prototypes)
    if info.world_size > 1 and cfg.sync_bn:
        if on_cuda:
            group = None
            if cfg.sync_bn_group_size:
                # every rank must create every group, in the same order
                groups = [dist.new_group(list(range(s, s + cfg.sync_bn_group_size)))
                          for s in range(0, info.world_size, cfg.sync_bn_group_size)]
                group = groups[info.rank // cfg.sync_bn_group_size]
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
        else:
            log("note: SyncBatchNorm needs CUDA; on CPU every rank normalises with its own batch statistics "
                "(plain BatchNorm)")
    model = model.to(info.device)
    # channels_last is the fast layout for cuDNN with bf16; on CPU it measured 2x slower here, so the
    # channels_last crops the pipelines hand over are made contiguous instead (one cheap copy per step).
    channels_last = cfg.channels_last and on_cuda
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if resume_from is None and info.is_main:
        # the exact starting point, for "before vs after" evaluations (tools/knn_eval.py --baseline)
        ckpt.export_trunk(model.state_dict(), run_dir / f"trunk_init_{cfg.arch}.pth")
    core = model
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if on_cuda else None)

    # ============================== optimiser ==============================
    optimizer = LARS(model.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                     trust_coefficient=cfg.lars_trust)
    lrs = lr_schedule(cfg.base_lr, cfg.final_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.start_warmup)
    queue_total = trimmed_queue_length(cfg, info.world_size)
    if cfg.queue_length and queue_total != cfg.queue_length:
        log(f"queue_length {cfg.queue_length} trimmed to {queue_total}, a multiple of the global batch")

    # ============================== resume ==============================
    start_epoch, iteration, queue = 0, 0, None
    if resume_from is not None:
        try:
            state = ckpt.load(resume_from, info.device)
        except ckpt.CheckpointError as e:
            log(f"[bold red]resume error:[/] {e}", highlight=False)
            return 2
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, iteration = state["epoch"], state["iteration"]
        if state["rng"] and len(state["rng"]) == info.world_size:
            ckpt.set_rng_state(state["rng"][info.rank])
        saved_q = state.get("queue")
        if saved_q is not None:
            if len(saved_q["buffers"]) == info.world_size:
                b = saved_q["buffers"][info.rank]
                queue = EmbeddingQueue(b.shape[0], b.shape[1], b.shape[2], cfg.batch_size, info.device)
                queue.load_state_dict({"buffer": b, "n_pushed": saved_q["n_pushed"]})
            else:
                log(f"note: the checkpoint's queue was saved by {len(saved_q['buffers'])} ranks, this run has "
                    f"{info.world_size}; starting with an empty queue (it refills in a few hundred steps)")
        log(f"resumed from {resume_from}: epoch {start_epoch}, iteration {iteration}", highlight=False)
        if start_epoch >= cfg.epochs:
            log(f"the run in {run_dir} has finished all {cfg.epochs} epochs; nothing to train")

    # ============================== training ==============================
    metrics = open(run_dir / "metrics.jsonl", "a") if info.is_main else None
    ln_k = math.log(cfg.nmb_prototypes)
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} (ln K {task.fields[lnk]:.3f})"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[sps]} samples/s"), TimeRemainingColumn(), console=console,
        disable=not info.is_main,
    )
    global_batch = cfg.batch_size * info.world_size
    last_epoch = cfg.stop_after_epoch or cfg.epochs
    with progress:
        for epoch in range(start_epoch, last_epoch):
            loader.set_epoch(epoch)
            if cfg.queue_length > 0 and epoch >= cfg.epoch_queue_starts and queue is None:
                queue = EmbeddingQueue(len(cfg.crops_for_assign), queue_total // info.world_size, cfg.feat_dim,
                                       cfg.batch_size, info.device)
            task = progress.add_task("train", total=steps_per_epoch, epoch=f"{epoch + 1}/{cfg.epochs}", loss="-",
                                     lnk=ln_k, lr="-", sps="-")
            model.train()
            loss_sum = torch.zeros((), device=info.device)
            t_epoch = t_log = time.perf_counter()
            n_log = skipped = 0
            for step, batch in enumerate(loader):
                lr = float(lrs[iteration])
                crops = batch.crops if channels_last else [c.contiguous() for c in batch.crops]
                loss = train_step(model, optimizer, crops, lr, iteration, cfg, queue, info.group, autocast)
                loss_sum += loss
                iteration += 1
                n_log += 1
                skipped += len(batch.skipped)
                if (step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch:
                    loss_value = loss.item()  # host sync point: once every log_every steps
                    now = time.perf_counter()
                    sps = n_log * global_batch / (now - t_log)
                    t_log, n_log = now, 0
                    progress.update(task, completed=step + 1, loss=f"{loss_value:.4f}", lr=f"{lr:.4g}",
                                    sps=f"{sps:.0f}")
                    if metrics:
                        metrics.write(json.dumps({"epoch": epoch, "iteration": iteration, "loss": loss_value,
                                                  "lr": lr, "samples_per_s": round(sps, 2)}) + "\n")
                        metrics.flush()
                    if not console.is_terminal:  # logs and CI: plain lines instead of the live bar
                        eta = (now - t_epoch) / (step + 1) * (steps_per_epoch * (last_epoch - epoch) - step - 1)
                        log(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {loss_value:.4f} "
                            f"(ln K {ln_k:.3f}) lr {lr:.4g} {sps:.0f} samples/s, ETA {eta / 60:.1f} min",
                            highlight=False)
                else:
                    progress.update(task, completed=step + 1)
            progress.remove_task(task)
            mean_loss = (loss_sum / steps_per_epoch).item()
            epoch_time = time.perf_counter() - t_epoch

            # checkpoint: every rank takes part in the gathers; rank 0 writes
            queue_state, rng_states = gather_queue(queue, info), gather_rng(info)
            if info.world_size > 1:  # unreadable images replaced this epoch, all ranks
                n = torch.tensor(skipped, device=info.device)
                dist.all_reduce(n)
                skipped = int(n.item())
            if info.is_main:
                ckpt.save_atomic({
                    "format": ckpt.FORMAT, "epoch": epoch + 1, "iteration": iteration,
                    "model": core.state_dict(), "optimizer": optimizer.state_dict(), "queue": queue_state,
                    "rng": rng_states, "config": dataclasses.asdict(cfg), "world_size": info.world_size,
                }, ckpt_path)
                metrics.write(json.dumps({"event": "epoch", "epoch": epoch, "loss": mean_loss, "ln_k": ln_k,
                                          "epoch_time_s": round(epoch_time, 2), "iteration": iteration,
                                          "queue_in_use": bool(queue is not None and queue.in_use),
                                          "skipped_images": skipped}) + "\n")
                metrics.flush()
            log(f"epoch {epoch + 1}/{cfg.epochs}: mean loss {mean_loss:.4f} (ln K = {ln_k:.3f}), "
                f"{epoch_time:.1f} s, {steps_per_epoch * global_batch / epoch_time:.0f} samples/s"
                + (", queue in use" if queue is not None and queue.in_use else "")
                + (f", [yellow]{skipped} unreadable image(s) replaced (see the warnings)[/]" if skipped else ""),
                highlight=False)

    # ============================== export ==============================
    if info.is_main:
        metrics.close()
        if last_epoch >= cfg.epochs:
            out = run_dir / f"trunk_{cfg.arch}.pth"
            ckpt.export_trunk(core.state_dict(), out)
            log(f"exported the trunk to {out} (loads into torchvision.models.{cfg.arch}(); fc.* is not included)",
                highlight=False)
        else:
            log(f"stopped after epoch {last_epoch} as asked; continue with: python train.py --run_dir {run_dir} "
                "--resume auto", highlight=False)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
