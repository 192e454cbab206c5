"""Linear evaluation of a frozen trunk: the protocol of the official swav eval_linear.py (REFERENCE section 8).

The trunk runs in eval mode under no_grad; a Linear(num_features, n_classes) (weights N(0, 0.01), bias 0, as
the official RegLog) is trained on its average-pooled features with cross-entropy and SGD: lr 0.3, momentum
0.9, weight decay 1e-6, nesterov off, batch 256, 100 epochs. The learning rate follows a cosine from 0.3 to 0
stepped **per epoch** (the official CosineAnnealingLR(epochs) with scheduler.step() after each epoch): epoch e
uses 0.3 * (1 + cos(pi * e / epochs)) / 2. Training views: RandomResizedCrop(size) + horizontal flip; test
views: Resize(round(size * 256 / 224)) + CenterCrop(size); both normalised with mean (0.485, 0.456, 0.406),
std (0.228, 0.224, 0.225). Top-1 and top-5 on --val after every --eval-every epochs and at the end.

``--train`` and ``--val`` each take an ImageFolder root (<root>/<class>/<image>.jpg) or a ``.beton`` written by
tools/write_ffcv.py, independently. A .beton is memory-mapped and each sample's stored JPEG bytes are decoded
with PIL to an RGB image, exactly as ImageFolder decodes a file, then the same views as above: a .beton
written from a folder (no file skipped) gives the folder's samples in its order, with its labels and pixels
(for the images kept byte for byte; re-encoded ones are write_ffcv's documented exception), so the same
figures. Class names of a .beton come from its sidecar ``<file>.beton.json``; both sets must name the same
classes in the same order (a .beton without a sidecar has unnamed classes, counted as its largest label + 1,
with a note).

The validation features are computed once and reused every epoch: the trunk is frozen and the test view
deterministic, so this is the protocol exactly, only faster. ``--precompute`` does the same for the training
images, with the *test* view instead of random crops and flips: a deviation from the protocol (no
augmentation, so usually a little lower accuracy on large data sets and faster overfitting), useful on CPU
where running the trunk every epoch is too slow. The default is the faithful path.

On several GPUs, ``torchrun --nproc_per_node=N tools/linear_eval.py ...`` (the official script ran on 8): each
rank reads and augments its share of every batch (``--batch-size`` stays the total, which N must divide) with its
own ``--workers``, the classifier's gradients are averaged over the ranks before each step, and each rank computes
the validation features of its share of the images; rank 0 prints, writes ``--json`` and ``--checkpoint``. The
images are visited in the order of a DistributedSampler seeded with ``--seed`` and the epoch, in one process too,
and each image's crop and flip are drawn from a generator seeded with (``--seed``, epoch, image), as train.py's
reference pipeline draws its views. So with a training set that N divides, N ranks train on the batches and views
of one process, whatever ``--workers`` (the sampler pads the shares to one length otherwise, repeating a few images
per epoch, as the official script's sampler does), and a resumed evaluation gives the numbers of an uninterrupted one.
``--precompute`` runs in one process only.

``--trunk`` takes a torchvision trunk (train.py's trunk_<arch>.pth, or ``python -m swav_fast.interop export``),
a swav_fast checkpoint (checkpoints/ckpt_*.pth, its model entry) or an official SwAV checkpoint
(``swav_800ep_pretrain.pth.tar``);
``--arch`` is read from the file when not given.

Usage::

    python tools/linear_eval.py --trunk runs/demo/trunk_resnet18.pth --train data/demo/digits/train \\
        --val data/demo/digits/val --size 32 --precompute --epochs 30
    python tools/write_ffcv.py /data/imagenet/train /data/imagenet_train.beton
    python tools/linear_eval.py --trunk runs/r50/trunk_resnet50.pth --train /data/imagenet_train.beton \\
        --val /data/imagenet/val
    torchrun --nproc_per_node=4 tools/linear_eval.py --trunk runs/r50/trunk_resnet50.pth \\
        --train /data/imagenet_train.beton --val /data/imagenet/val --checkpoint runs/r50/linear.pth
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torchvision import transforms

if __package__ in (None, ""):  # run as `python tools/linear_eval.py`: make `tools` and `swav_fast` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.reference import seeded_draws  # noqa: E402
from swav_fast.checkpoint import save_atomic  # noqa: E402
from swav_fast.distributed import (  # noqa: E402
    DeviceError,
    DistInfo,
    average_gradients_,
    run_main,
    shutdown,
    world_size_from_env,
)
from tools.knn_eval import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    SharedError,
    add_dist_timeout_argument,
    check_classes,
    compute_features,
    eval_dataset,
    eval_device,
    load_eval_trunk,
    print_error,
    rank_share,
    torchrun_device_problem,
)

CHECKPOINT_FORMAT = "swav_fast linear_eval/2"
DEFAULTS = {"epochs": 100, "lr": 0.3, "final_lr": 0.0, "momentum": 0.9, "wd": 1e-6, "batch_size": 256}


def cosine_lr(epoch: int, epochs: int, base_lr: float = 0.3, final_lr: float = 0.0) -> float:
    """Learning rate of ``epoch`` (0-based): the official per-epoch cosine, base_lr at 0, final_lr at ``epochs``."""
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * epoch / epochs))


def train_transform(size: int) -> transforms.Compose:
    """The protocol's training view: RandomResizedCrop(size) (scale 0.08-1), horizontal flip, normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


class SeededViews(torch.utils.data.Dataset):
    """``dataset`` indexed by (epoch, index): each sample's random view drawn from torch's generator seeded with
    (seed, epoch, index), as train.py's reference pipeline does. The views are then a pure function of those three,
    whatever the worker count, the rank count or the resume point; the caller's generator is left as it was."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded_draws(self.seed, epoch, index):
            return self.dataset[index]


class EpochSampler(torch.utils.data.Sampler):
    """A DistributedSampler's indices as (epoch, index) keys for SeededViews: the epoch travels with each index to
    the loader's worker processes, persistent ones included."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)


@torch.no_grad()
def _frozen_features(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return trunk(images).float().flatten(1)


def _on_device(feats: torch.Tensor, labels: torch.Tensor, device: torch.device,
               say=None) -> tuple[torch.Tensor, torch.Tensor]:
    """--precompute's training features moved to ``device`` once (ImageNet's are 10 GB in fp32), so an epoch's
    batches are gathered there instead of indexed on the host and copied from pageable memory one by one; where
    they do not fit they stay on the host, and ``say`` is told."""
    if device.type == "cpu" or feats.device == device:
        return feats, labels
    try:
        return feats.to(device), labels.to(device)
    except torch.OutOfMemoryError:
        if say:
            say(f"note: the {feats.numel() * feats.element_size() / 2**30:.1f} GiB of precomputed training features "
                f"do not fit on {device}; they stay on the host (each batch copied over)")
        return feats, labels


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows have their target among the k highest logits, for each k (k clipped to the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets.view(-1, 1)
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def _evaluate(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, device: torch.device, n_total: int,
              group: dist.ProcessGroup | None = None, batch_size: int = 4096) -> tuple[float, float]:
    """(top-1, top-5) in percent of ``n_total``: the hits among this rank's ``feats``, summed over the ranks of
    ``group`` (each holds its own part of the validation set)."""
    head.eval()
    correct = torch.zeros(2, dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, len(feats), batch_size):
            logits = head(feats[start:start + batch_size].to(device))
            correct += torch.tensor(topk_correct(logits, labels[start:start + batch_size].to(device)), device=device)
    if group is not None:
        dist.all_reduce(correct, group=group)
    head.train()
    c1, c5 = correct.tolist()
    return 100.0 * c1 / n_total, 100.0 * c5 / n_total


def linear_eval(
    trunk: nn.Module,
    train_dir: str | Path,
    val_dir: str | Path,
    size: int = 224,
    epochs: int = DEFAULTS["epochs"],
    lr: float = DEFAULTS["lr"],
    final_lr: float = DEFAULTS["final_lr"],
    momentum: float = DEFAULTS["momentum"],
    wd: float = DEFAULTS["wd"],
    batch_size: int = DEFAULTS["batch_size"],
    nesterov: bool = False,
    precompute: bool = False,
    eval_every: int = 1,
    workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 31,
    console: Console | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: str | Path | None = None,
    dist_info: DistInfo | None = None,
) -> dict:
    """Train a linear classifier on the frozen ``trunk``'s features; returns the figures and per-epoch history.

    Result keys: top1, top5 (after the last epoch, percent), best_top1 (the best evaluated epoch, which is what
    the official script reports), top5_k (5, or the class count when smaller), n_train, n_val, n_classes,
    num_features, history (one dict per epoch: epoch, lr, train_loss, train_top1 and, on evaluated epochs,
    val_top1, val_top5). ``on_epoch`` is called with each history entry.

    The training images are visited in the order of a DistributedSampler seeded with ``seed`` and the epoch
    (one replica in one process), each with the view of SeededViews (a pure function of seed, epoch and image).
    With ``dist_info`` of several ranks (torchrun), each rank takes its share of every batch of ``batch_size``
    images (which the world size must divide) and of the validation images, the classifier's gradients are
    averaged over the ranks before each step, and the figures are summed over them: with the training images a
    multiple of the world size, the same batches and views as one process, so the same classifier up to float
    rounding. ``precompute`` runs in one process only. Every rank returns the same result.

    With ``checkpoint``, the classifier, its optimiser, the history and precompute's shuffling state are written
    there after every epoch (atomically, by rank 0), and an existing file of the same settings, world size and
    trunk is continued from (rank 0 reads it and sends it to the other ranks, so it may lie on rank 0's node
    alone): the resumed run gives the same numbers as an uninterrupted one, whatever ``workers``. The result then
    has ``resumed_from_epoch``.
    """
    world, rank = (dist_info.world_size, dist_info.rank) if dist_info is not None else (1, 0)
    group = dist_info.group if dist_info is not None else None
    main_rank = rank == 0
    if epochs < 1 or batch_size < 1 or eval_every < 1 or size < 1:
        raise ValueError("epochs, batch_size, eval_every and size must be at least 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr} must be a finite number > 0")
    for name, value in (("final_lr", final_lr), ("momentum", momentum), ("wd", wd)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value} must be a finite number >= 0")
    if final_lr > lr:
        raise ValueError(f"final_lr={final_lr} is above lr={lr}: the cosine would raise the learning rate")
    if nesterov and momentum == 0:
        raise ValueError("nesterov needs a momentum above 0")
    problem = _ranks_problem(world, precompute, batch_size)
    if problem:
        raise ValueError(problem)
    n_classes, notes = check_classes(train_dir, val_dir)  # each an ImageFolder root or a write_ffcv .beton
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if checkpoint.is_dir():
            raise ValueError(f"--checkpoint {checkpoint} is a directory: pass the path of a file")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    console = console or Console(stderr=True)
    if main_rank:
        for note in notes:
            console.print(f"note: {note}", highlight=False, soft_wrap=True)
    trunk = trunk.to(device).eval()

    val_set = eval_dataset(val_dir, size, "--val")  # the test view (knn_eval.eval_transform)
    train_set = eval_dataset(train_dir, size, "--train")
    n_train, n_val = len(train_set), len(val_set)
    val_part = rank_share(val_set, dist_info, f"--val {val_dir}")  # this rank's validation images
    if not precompute:
        train_set.transform = train_transform(size)
    local_batch = batch_size // world
    pin = device.type == "cuda"
    generator = torch.Generator().manual_seed(seed)  # precompute's order (and the worker processes' base seed)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    train_loader = torch.utils.data.DataLoader(SeededViews(train_set, seed), batch_size=local_batch,
                                               sampler=EpochSampler(sampler), num_workers=workers, pin_memory=pin,
                                               generator=generator, persistent_workers=workers > 0 and not precompute)
    val_loader = torch.utils.data.DataLoader(val_part, batch_size=local_batch, num_workers=workers, pin_memory=pin)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    history: list[dict] = []
    with Progress(*columns, console=console, transient=True, disable=not main_rank) as progress:
        val_feats, val_labels = compute_features(trunk, val_loader, device, progress, "val features")
        if precompute:
            train_feats, train_labels = compute_features(
                trunk, torch.utils.data.DataLoader(train_set, batch_size=batch_size, num_workers=workers,
                                                   pin_memory=pin),
                device, progress, "train features (test view)")
            train_feats, train_labels = _on_device(train_feats, train_labels, device,
                                                   progress.console.print if main_rank else None)
        num_features = val_feats.shape[1]

        torch.manual_seed(seed)
        # drawn on the CPU: the same initial classifier on every rank, whichever GPU it has (a CUDA generator's
        # numbers land on other elements on a GPU with another number of SMs)
        head = nn.Linear(num_features, n_classes)
        nn.init.normal_(head.weight, mean=0.0, std=0.01)
        nn.init.zeros_(head.bias)
        head = head.to(device)
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
        # what a checkpoint must share with this run to be continued by it (eval_every and workers may change)
        identity = {"epochs": epochs, "lr": lr, "final_lr": final_lr, "momentum": momentum, "wd": wd,
                    "batch_size": batch_size, "nesterov": nesterov, "precompute": precompute, "seed": seed,
                    "size": size, "n_train": n_train, "n_val": n_val, "n_classes": n_classes,
                    "num_features": num_features, "world_size": world, "trunk_checksum": _trunk_checksum(trunk)}
        start_epoch = 0
        if checkpoint is not None:
            history, start_epoch = _resume(checkpoint, identity, head, optimizer, generator, dist_info)
            if start_epoch and main_rank:
                console.print(f"resumed from {checkpoint}: {start_epoch} of {epochs} epochs done", highlight=False,
                              soft_wrap=True)
            for entry in history:
                if on_epoch:
                    on_epoch(entry)

        epoch_task = progress.add_task("linear eval", total=epochs, completed=start_epoch)
        for epoch in range(start_epoch, epochs):
            epoch_lr = cosine_lr(epoch, epochs, lr, final_lr)
            for param_group in optimizer.param_groups:
                param_group["lr"] = epoch_lr
            # summed on the device (no host sync per step), then over the ranks: [loss sum, correct, images]
            totals = torch.zeros(3, dtype=torch.float64, device=device)
            seen = 0
            if precompute:
                order = torch.randperm(len(train_feats), generator=generator).to(train_feats.device)
                batches = ((train_feats[idx], train_labels[idx]) for idx in order.split(batch_size))
                batch_task = None
            else:
                sampler.set_epoch(epoch)
                batches = ((_frozen_features(trunk, x.to(device, non_blocking=True)), y) for x, y in train_loader)
                batch_task = progress.add_task(f"epoch {epoch + 1}", total=len(train_loader))
            for feats, targets in batches:
                # non_blocking: a pinned copy queued behind the trunk, not a wait for it (no host sync per step)
                feats, targets = feats.to(device).float().flatten(1), targets.to(device, non_blocking=True)
                logits = head(feats.detach())
                loss = F.cross_entropy(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # the mean over the whole batch: every rank's share is the same size (the sampler pads the
                # shares to one length), so the average of the ranks' means
                average_gradients_([p.grad for p in head.parameters()], group)
                optimizer.step()
                totals[0] += loss.detach().double() * len(targets)
                totals[1] += (logits.detach().argmax(dim=1) == targets).sum()
                seen += len(targets)
                if batch_task is not None:
                    progress.advance(batch_task)
            if batch_task is not None:
                progress.remove_task(batch_task)
            totals[2] = seen
            if group is not None:
                dist.all_reduce(totals, group=group)
            loss_sum, correct, seen = totals.tolist()
            entry = {"epoch": epoch + 1, "lr": epoch_lr, "train_loss": loss_sum / seen,
                     "train_top1": 100.0 * correct / seen}
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                entry["val_top1"], entry["val_top5"] = _evaluate(head, val_feats, val_labels, device, n_val, group)
            history.append(entry)
            if checkpoint is not None and main_rank:
                save_atomic({"format": CHECKPOINT_FORMAT, "identity": identity, "head": head.state_dict(),
                             "optimizer": optimizer.state_dict(), "history": history,
                             "generator": generator.get_state()}, checkpoint)
            if on_epoch:
                on_epoch(entry)
            progress.advance(epoch_task)

    evaluated = [h for h in history if "val_top1" in h]
    return {
        "top1": history[-1]["val_top1"],
        "top5": history[-1]["val_top5"],
        "best_top1": max(h["val_top1"] for h in evaluated),
        "top5_k": min(5, n_classes),
        "n_train": n_train,
        "n_val": n_val,
        "n_classes": n_classes,
        "num_features": num_features,
        "history": history,
        **({"resumed_from_epoch": start_epoch} if start_epoch else {}),
    }


def _trunk_checksum(trunk: nn.Module) -> float:
    """A number that tells two trunks apart (the sum of every floating-point tensor, in float64)."""
    return sum(float(v.detach().cpu().double().sum()) for v in trunk.state_dict().values() if v.is_floating_point())


def _resume(path: Path, identity: dict, head: nn.Module, optimizer: torch.optim.Optimizer,
            generator: torch.Generator, dist_info: DistInfo | None = None) -> tuple[list[dict], int]:
    """Continue from the linear-eval checkpoint ``path`` when it exists: the head, the optimiser and the random
    states loaded; (history, epochs done), or ([], 0) without a file. ValueError naming the file when it is not
    one or was written by another evaluation. With several ranks, rank 0 (the one that writes it) reads the file
    and sends it to the others, so it may lie on rank 0's node alone and every rank continues the same state;
    every rank raises the same error."""
    state, problem = None, None
    if (dist_info is None or dist_info.is_main) and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which and why
            problem = (f"--checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to start over, "
                       "or pass another --checkpoint")
        else:
            problem = _foreign_checkpoint(path, state, identity)
    if dist_info is not None and dist_info.world_size > 1:
        shared = [None if problem else state, problem]
        dist.broadcast_object_list(shared, src=0, group=dist_info.control)
        state, problem = shared
        if problem:
            raise SharedError(problem)
    elif problem:
        raise ValueError(problem)
    if state is None or not state["history"]:
        return [], 0
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["history"], len(state["history"])


def _foreign_checkpoint(path: Path, state, identity: dict) -> str | None:
    """Why the loaded ``state`` cannot be continued by the evaluation of ``identity``; None when it can."""
    if isinstance(state, dict) and state.get("format") == "swav_fast linear_eval/1":
        return (f"--checkpoint {path} was written by an older linear_eval, which visited the images in another "
                "order; delete it to start over, or pass another --checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return f"--checkpoint {path} is not a linear_eval checkpoint; pass another --checkpoint"
    saved = state["identity"]
    # the trunk's checksum to the last bits of another CPU's summation order
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in identity.items() if saved.get(k) != v and not (
        k == "trunk_checksum" and isinstance(saved.get(k), float) and math.isclose(saved[k], v, rel_tol=1e-9))]
    if changed:
        return (f"--checkpoint {path} was written by another evaluation ({', '.join(changed)}); run with its "
                "settings, world size and trunk to continue it, or pass another --checkpoint to start over")
    return None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Linear evaluation of a frozen trunk: a linear classifier trained on its pooled features. The "
                    "defaults are the recipe of the official SwAV eval_linear.py: SGD lr 0.3 with a per-epoch cosine "
                    "to 0, momentum 0.9, weight decay 1e-6, batch 256, 100 epochs.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trunk", type=Path,
                        help="torchvision trunk (trunk_<arch>.pth), swav_fast checkpoints/ckpt_*.pth or official SwAV "
                             "checkpoint (.pth.tar)")
    source.add_argument("--random-init", action="store_true", help="evaluate --arch at its seeded random init")
    parser.add_argument("--arch", help="torchvision architecture (default: read from --trunk)")
    parser.add_argument("--train", required=True, type=Path,
                        help="data the classifier is trained on: ImageFolder root or .beton written by "
                             "tools/write_ffcv.py")
    parser.add_argument("--val", required=True, type=Path,
                        help="data for top-1 / top-5: ImageFolder root or .beton written by tools/write_ffcv.py")
    parser.add_argument("--size", type=int, default=224, help="crop size (default 224; test resize size*256/224)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="default 100")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="initial lr, cosine per epoch (default 0.3)")
    parser.add_argument("--final-lr", type=float, default=DEFAULTS["final_lr"], help="cosine end value (default 0)")
    parser.add_argument("--momentum", type=float, default=DEFAULTS["momentum"], help="default 0.9")
    parser.add_argument("--wd", type=float, default=DEFAULTS["wd"], help="weight decay (default 1e-6)")
    parser.add_argument("--nesterov", action="store_true", help="nesterov momentum (default off, as official)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="default 256")
    parser.add_argument("--precompute", action="store_true",
                        help="DEVIATION, for CPU: train on features of the test view computed once (no random "
                             "crops or flips) instead of running the trunk on augmented views every epoch")
    parser.add_argument("--eval-every", type=int, default=1, help="evaluate on --val every N epochs (and at the end)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_dist_timeout_argument(parser)
    parser.add_argument("--seed", type=int, default=31, help="classifier init and shuffling (default 31)")
    parser.add_argument("--json", type=Path, help="write settings, final figures and history to this JSON file")
    parser.add_argument("--checkpoint", type=Path,
                        help="save the classifier after every epoch to this file, and continue from it when it "
                             "exists (the same settings and trunk): a long evaluation can be stopped and resumed")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow --trunk files with arbitrary pickled objects (runs code from the file)")
    args = parser.parse_args(argv)
    # every number is checked here, before any trunk or image is read
    for name in ("epochs", "batch_size", "size", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr {args.lr}: must be a finite number > 0")
    for name in ("final_lr", "momentum", "wd"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a finite number >= 0")
    if args.final_lr > args.lr:
        parser.error(f"--final-lr {args.final_lr} is above --lr {args.lr}: the cosine would raise the learning rate; "
                     "were the two swapped?")
    if args.nesterov and args.momentum == 0:
        parser.error("--nesterov needs --momentum above 0")
    if args.workers < 0:
        parser.error(f"--workers {args.workers}: must be 0 or more")
    if args.random_init and not args.arch:
        parser.error("--random-init needs --arch")
    problem = (_ranks_problem(world_size_from_env(), args.precompute, args.batch_size)
               or torchrun_device_problem(args.device))
    if problem:
        parser.error(problem)
    return args


def _ranks_problem(world: int, precompute: bool, batch_size: int) -> str | None:
    """Why the evaluation cannot run on ``world`` ranks (torchrun) as asked; None when it can."""
    if world > 1 and precompute:
        return (f"--precompute runs in one process, not on {world} ranks: drop it (the faithful path shares its work "
                "among the ranks), or run without torchrun")
    if batch_size % world:
        return (f"--batch-size {batch_size} is the total over the {world} ranks and must be a multiple of it: pass "
                f"for example {max(world, batch_size // world * world)}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    console = Console(stderr=True)
    dist_info = None
    try:
        check_classes(args.train, args.val)  # bad data fails before the trunk is loaded
        trunk, arch, kind = load_eval_trunk(None if args.random_init else args.trunk, args.arch, args.trust_pickle)
        dist_info, device = eval_device(args.device, args.dist_timeout)
        main_rank = dist_info is None or dist_info.is_main
        mode = "precomputed test-view features (deviation)" if args.precompute else "faithful (augmented views)"
        ranks = f" on {dist_info.world_size} ranks" if dist_info else ""
        if main_rank:
            print(f"linear eval: {arch} trunk ({kind}) from {args.trunk or 'random init'}, {args.epochs} epochs, "
                  f"{mode}, lr {args.lr} cosine per epoch, batch {args.batch_size}, device {device}{ranks}")

        def report(entry: dict) -> None:
            line = (f"epoch {entry['epoch']:>3}/{args.epochs}  lr {entry['lr']:.4f}  loss {entry['train_loss']:.4f}"
                    f"  train top-1 {entry['train_top1']:6.2f}%")
            if "val_top1" in entry:
                line += f"  val top-1 {entry['val_top1']:6.2f}%  top-5 {entry['val_top5']:6.2f}%"
            print(line, flush=True)

        start = time.perf_counter()
        result = linear_eval(trunk, args.train, args.val, args.size, args.epochs, args.lr, args.final_lr,
                             args.momentum, args.wd, args.batch_size, args.nesterov, args.precompute,
                             args.eval_every, args.workers, device, args.seed, console,
                             report if main_rank else None, args.checkpoint, dist_info)
        elapsed = time.perf_counter() - start
    except (OSError, ValueError, DeviceError) as exc:  # a missing file, a full disk, a data or device mistake
        print_error("linear_eval", exc)
        return 2  # a usage or data mistake, as train.py's config errors and argparse's
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (and under torchrun, each rank's orderly exit)
        if int(os.environ.get("RANK", "0")) == 0:
            kept = (f"{args.checkpoint} holds the epochs done; the same command continues from it" if args.checkpoint
                    else "pass --checkpoint FILE to make a long evaluation resumable")
            print(f"linear_eval: interrupted; {kept}", file=sys.stderr)
        return 130
    finally:
        if dist_info is not None:
            shutdown()

    if not main_rank:
        return 0
    print(f"linear eval top-1 {result['top1']:.2f}%  top-{result['top5_k']} {result['top5']:.2f}%  "
          f"(best epoch top-1 {result['best_top1']:.2f}%; {result['n_train']} train / {result['n_val']} val "
          f"images, {result['n_classes']} classes, {elapsed:.0f} s)")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        settings.update(arch=arch, trunk_kind=kind, device=str(device), lr_schedule="cosine, stepped per epoch",
                        world_size=dist_info.world_size if dist_info else 1, elapsed_s=round(elapsed, 2))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, **result}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)
