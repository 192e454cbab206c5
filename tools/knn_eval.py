"""Weighted kNN evaluation of frozen trunk features (the protocol of DINO, Caron et al. 2021).

Features are the trunk's pooled output, L2-normalised; a query's k nearest training images by cosine
similarity each vote for their class with weight exp(similarity / T), and the class with the largest summed
vote wins. Reported twice: with every training label as the bank, and with only a few labels per class
(mean and std over seeded draws of the labelled bank).

``--train`` and ``--val`` each take an ImageFolder root (<root>/<class>/<image>.jpg) or a ``.beton`` written by
tools/write_ffcv.py (its JPEG bytes are decoded with PIL to RGB, exactly as ImageFolder decodes a file, then
the same evaluation view: see :func:`eval_dataset`). Class names of a .beton come from its sidecar
``<file>.beton.json``; the two sets must name the same classes in the same order.

The kNN runs on ``--device`` (the feature bank in fp32 on the GPU; on the CPU, with a note, when it does not fit).
Under ``torchrun --nproc_per_node=N`` the feature passes, which read and decode every image, are shared: each rank
computes the features of its share of the images (rank, rank + N, ...), rank 0 receives them all in order and
computes the figures of one process, and alone prints and writes ``--json``.

Usage::

    python tools/knn_eval.py --trunk RUN/trunk_resnet18.pth \\
        --train data/demo/digits/train --val data/demo/digits/val --size 32 --compare-random-init
    torchrun --nproc_per_node=4 tools/knn_eval.py --trunk runs/r50/trunk_resnet50.pth \\
        --train /data/imagenet_train.beton --val /data/imagenet/val --workers 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn
from torchvision import transforms

if __package__ in (None, ""):  # run as `python tools/knn_eval.py`: make `tools` and `pipelines` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swav_fast.distributed import (  # noqa: E402
    DeviceError,
    DistInfo,
    init_distributed,
    run_main,
    shutdown,
    world_size_from_env,
)
from swav_fast.interop import InteropError, infer_arch, read_checkpoint  # noqa: E402
from swav_fast.model import trunk_state_dict  # noqa: E402
from tools.write_ffcv import BetonImages  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.228, 0.224, 0.225)


def load_trunk(path: str | None, arch: str, seed: int = 0) -> nn.Module:
    """Torchvision ``arch`` with the weights in ``path`` (or seeded random init) and ``fc`` set to Identity.

    ``path`` is a plain state_dict file. Only ``fc.*`` keys may be absent; anything else missing or extra
    means the file is not a trunk of this architecture, and a ValueError says so instead of silently
    evaluating a half-random network.
    """
    torch.manual_seed(seed)
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError as exc:
        raise ValueError(f"--arch {arch!r} is not a torchvision model name ({exc})") from exc

    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"trunk file {file} does not exist; export one with train.py")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{file} could not be read as a torch state_dict file: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            keys = ", ".join(list(state)[:5]) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{file} is not a plain state_dict of tensors (found: {keys}); "
                "it may be a full training checkpoint. Export the trunk with train.py"
            )
        # The classifier head is discarded below, so its weights (any shape, or none) do not matter.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [
            f"{k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape
        ]
        if problems:
            shown = ", ".join(problems[:4]) + (
                f", ... ({len(problems)} problems)" if len(problems) > 4 else ""
            )
            raise ValueError(
                f"{file} does not look like a torchvision {arch} trunk: {shown}. Export one with train.py"
            )
        model.load_state_dict(state, strict=False)

    model.fc = nn.Identity()
    return model.eval()


def load_eval_trunk(path: str | Path | None, arch: str | None = None, trust_pickle: bool = False,
                    option: str = "--trunk") -> tuple[nn.Module, str, str]:
    """(frozen trunk in eval mode with fc = Identity, arch, kind of file) for ``--trunk``.

    ``path`` None gives the seeded random initialisation of ``arch`` (kind "random init"). The architecture
    is read from the file's shapes; an explicit ``arch`` that disagrees is an error naming both. Errors name the
    file as the command-line ``option`` that gave it.
    """
    if path is None:
        if arch is None:
            raise ValueError("--arch is needed with --random-init")
        return load_trunk(None, arch), arch, "random init"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file; pass a trunk exported by train.py, a run's "
                                "checkpoint (checkpoints/ckpt_*.pth) or an official SwAV checkpoint")
    try:
        state, kind = read_checkpoint(path, trust_pickle)
    except InteropError as exc:
        raise ValueError(f"{option}: {exc}") from exc
    trunk = trunk_state_dict(state)
    try:
        found = infer_arch(trunk)
    except InteropError as exc:
        if arch is None:
            raise ValueError(f"{option} {path}: {exc}; pass --arch if it is a torchvision model") from exc
        found = None
    if arch is not None and found is not None and arch != found:
        raise ValueError(f"{option} {path} holds a {found} trunk but --arch is {arch}: pass --arch {found}")
    arch = arch or found
    if kind == "torchvision":
        return load_trunk(str(path), arch), arch, kind
    model = load_trunk(None, arch)  # fc is already Identity: the trunk keys are the whole state_dict
    try:
        model.load_state_dict(trunk, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{option} {path} ({kind}) does not fit torchvision {arch}: {exc}") from exc
    return model.eval(), arch, kind


def eval_transform(size: int) -> transforms.Compose:
    """The standard evaluation view: resize to size*256/224, centre crop ``size``, ImageNet normalisation."""
    return transforms.Compose(
        [
            transforms.Resize(round(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def image_folder(folder: str | Path, size: int) -> torchvision.datasets.ImageFolder:
    """``ImageFolder(folder)`` with the evaluation transform, and errors that say which folder is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; build the demo data with tools/make_demo_data.py"
        )
    try:
        return torchvision.datasets.ImageFolder(str(folder), transform=eval_transform(size))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{folder} holds no images in the ImageFolder layout (<folder>/<class>/<image>.jpg): {exc}"
        ) from exc


def check_data(path: str | Path, option: str) -> Path:
    """``path`` given to ``option`` (--train / --val), checked: an ImageFolder directory or an existing file
    (taken for a .beton); a missing path is a FileNotFoundError saying what to pass."""
    path = Path(path)
    if path.is_dir() or path.is_file():
        return path
    if path.suffix == ".beton":
        raise FileNotFoundError(f"{option} {path}: no such .beton file; write one from an ImageFolder with "
                                f"`python tools/write_ffcv.py <ImageFolder root> {path}`")
    raise FileNotFoundError(f"{option} {path}: no such directory; pass an ImageFolder root "
                            "(<root>/<class>/<image>.jpg) or a .beton written by tools/write_ffcv.py")


def open_beton_images(path: str | Path, option: str, transform=None) -> BetonImages:
    """:class:`tools.write_ffcv.BetonImages` of ``path``; its errors are prefixed with ``option``."""
    try:
        return BetonImages(path, transform)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"{option} {exc}") from exc


def eval_dataset(path: str | Path, size: int, option: str = "data") -> torchvision.datasets.ImageFolder | BetonImages:
    """(image tensor, label) dataset of an ImageFolder root or a tools/write_ffcv.py .beton, with the evaluation
    transform. Both decode to a PIL RGB image first (a .beton's stored JPEG bytes as ImageFolder decodes a
    file) and list samples in the same order (sorted classes, sorted files), so a .beton written from a folder
    gives the folder's samples; set ``.transform`` for another view."""
    path = check_data(path, option)
    if path.is_dir():
        return image_folder(path, size)
    return open_beton_images(path, option, eval_transform(size))


def data_classes(path: str | Path, option: str) -> tuple[list[str] | None, int, str | None]:
    """(class names or None, number of classes, note or None) of an ImageFolder root or a .beton.

    A folder's classes are its sorted sub-folders; a .beton's come from its sidecar <file>.json, or, without
    one, are unnamed and counted as the largest label + 1 (with a note saying so).
    """
    path = check_data(path, option)
    if path.is_dir():
        names = folder_classes(path)
        return names, len(names), None
    data = open_beton_images(path, option)
    return data.classes, data.num_classes, data.note and f"{option}: {data.note}"


def check_classes(train: str | Path, val: str | Path) -> tuple[int, list[str]]:
    """(number of classes, notes) for ``--train`` / ``--val`` data (folders or .betons, mixed as you like).

    When both name their classes, the names must be the same in the same order (labels are class indices);
    when one does not (a .beton without sidecar), the count is the larger of the two and any named side must
    cover the other's labels. Errors say which option is wrong.
    """
    train_names, train_n, train_note = data_classes(train, "--train")
    val_names, val_n, val_note = data_classes(val, "--val")
    if train_names is not None and val_names is not None:
        if train_names != val_names:
            # ImageFolder numbers classes by sorted folder name, so differing sets would shift every label.
            raise ValueError(
                f"--train {train} and --val {val} have different classes ({len(train_names)}: "
                f"{_shown(train_names)} vs {len(val_names)}: {_shown(val_names)}; class folders, or the classes "
                "in a .beton's <file>.json); they must match for the labels to line up"
            )
        return train_n, []
    for option, names, path, other_n, other in (("--train", train_names, train, val_n, "--val"),
                                                 ("--val", val_names, val, train_n, "--train")):
        if names is not None and other_n > len(names):
            raise ValueError(f"{other} has labels up to {other_n - 1} but {option} {path} has only {len(names)} "
                             "classes: they do not number their classes the same way")
    return max(train_n, val_n), [n for n in (train_note, val_note) if n]


def _shown(names: list[str], first: int = 5) -> str:
    return ", ".join(names[:first]) + (", ..." if len(names) > first else "")


@torch.no_grad()
def compute_features(trunk: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                     progress: Progress | None = None, description: str = "features") -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Raw (not normalised) pooled trunk features of every batch of ``loader``: (float32 [N, D] on CPU, labels).

    Linear evaluation uses the features as they are; extract_features L2-normalises them.
    """
    trunk.eval()
    task = progress.add_task(description, total=len(loader)) if progress else None
    feats, labels = [], []
    for images, targets in loader:
        feats.append(trunk(images.to(device, non_blocking=True)).float().flatten(1).cpu())
        labels.append(targets)
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return torch.cat(feats), torch.cat(labels).long()


class SharedError(ValueError):
    """A mistake every rank finds alike under torchrun (the same data, or a decision the ranks agreed on): said
    once, by rank 0 (print_error)."""


def torchrun_device_problem(device: str | None) -> str | None:
    """Why ``--device`` cannot be used under torchrun (a GPU index: each rank takes its LOCAL_RANK's); None when it
    can, or without torchrun."""
    if world_size_from_env() > 1 and device not in (None, "cuda", "cpu"):
        return (f"--device {device}: under torchrun each rank takes the GPU of its LOCAL_RANK; pass --device cuda or "
                "cpu, or leave it out")
    return None


def add_dist_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """--dist-timeout MINUTES, as train.py's --dist_timeout_minutes (0: torch's defaults)."""

    def minutes(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(f"{text!r}: give a number of minutes >= 0 (0: torch's defaults)")
        return value

    parser.add_argument("--dist-timeout", type=minutes, default=0.0, metavar="MINUTES",
                        help="under torchrun: how long a rank waits for the others in one collective before it "
                             "stops with a timeout error (default 0: torch's, 10 minutes with NCCL, 30 with gloo)")


def eval_device(device: str | None, timeout_minutes: float = 0.0) -> tuple[DistInfo | None, torch.device]:
    """(the process group joined, this rank's device) under torchrun, one rank per GPU (or CPU process); else
    (None, ``--device``, or cuda when there is one). ``timeout_minutes``: see init_distributed."""
    if world_size_from_env() > 1:
        dist_info = init_distributed(device or "auto", timeout_minutes)
        return dist_info, dist_info.device
    return None, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def rank_share(dataset: torch.utils.data.Dataset, dist_info: DistInfo | None, what: str) -> torch.utils.data.Dataset:
    """This rank's share of ``dataset`` (items rank, rank + W, ...: none counted twice); all of it in one process.
    SharedError when there are fewer items than ranks (``what`` names the data)."""
    if dist_info is None or dist_info.world_size == 1:
        return dataset
    world, n = dist_info.world_size, len(dataset)
    if n < world:
        raise SharedError(f"{what} has {n} images, fewer than the {world} ranks that share them: run on fewer ranks")
    return torch.utils.data.Subset(dataset, range(dist_info.rank, n, world))


def print_error(tool: str, exc: BaseException) -> None:
    """A tool's one-line error: by rank 0; by another rank too, with its number, unless every rank has it
    (SharedError), since it may be that rank's alone (its node's files). RANK is read from the environment, so this
    also works before the process group is joined."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"{tool}: error: {exc}", file=sys.stderr)
    elif not isinstance(exc, SharedError):
        print(f"{tool}: error (rank {rank}): {exc}", file=sys.stderr)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    folder: str | Path,
    size: int,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device = "cpu",
    dist_info: DistInfo | None = None,
    dataset: torch.utils.data.Dataset | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Features of every image in an ImageFolder or .beton: (float32 [N, D] L2-normalised rows, int64 [N] labels).

    With ``dist_info`` of several ranks, each rank computes the features of its share (images rank, rank + W, ...)
    and rank 0 receives them all, in the dataset's order, as one process would have them; the other ranks get
    (None, None). ``dataset``: eval_dataset(folder, size) made already (a folder listed once for several trunks)."""
    dataset = eval_dataset(folder, size) if dataset is None else dataset
    world, rank = (dist_info.world_size, dist_info.rank) if dist_info is not None else (1, 0)
    part = rank_share(dataset, dist_info, str(folder))
    loader = torch.utils.data.DataLoader(
        part,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    with Progress(transient=True, disable=rank != 0) as progress:
        feats, labels = compute_features(model.to(device), loader, torch.device(device), progress,
                                         f"features {Path(folder).name}")
    if world > 1:
        feats = gather_shares(feats, len(dataset), dist_info)
        if rank != 0:
            return None, None
        labels = torch.as_tensor(np.asarray(dataset.targets, dtype=np.int64))  # every image's, in order
    return F.normalize(feats, dim=1), labels


def gather_shares(feats: torch.Tensor, n: int, dist_info: DistInfo, rows_per_call: int = 16384
                  ) -> torch.Tensor | None:
    """Each rank's share of features (rows rank, rank + W, ... of ``n``) gathered on rank 0 in the dataset's
    order, through the host-side gloo group in blocks of ``rows_per_call`` rows (bounded memory, no GPU stream
    involved); None on the other ranks."""
    world, rank = dist_info.world_size, dist_info.rank
    longest = -(-n // world)  # rank 0's share; the others have as many rows or one fewer
    out = torch.empty(n, feats.shape[1]) if rank == 0 else None
    for start in range(0, longest, rows_per_call):
        block = torch.zeros(min(rows_per_call, longest - start), feats.shape[1])
        mine = feats[start:start + len(block)]
        block[:len(mine)] = mine
        blocks = [torch.empty_like(block) for _ in range(world)] if rank == 0 else None
        dist.gather(block, blocks, dst=0, group=dist_info.control)
        if rank == 0:
            for r, got in enumerate(blocks):
                rows = torch.arange(r, n, world)[start:start + len(block)]  # the dataset rows of this block
                out[rows] = got[:len(rows)]
    return out


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    n_classes: int | None = None,
    chunk: int = 1024,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Weighted kNN class predictions (int64 [N_test], on the CPU) for ``test_feats`` against the bank
    ``train_feats``, computed on ``device`` (default: the bank's own device).

    Rows are L2-normalised here as well, so the similarity is the cosine whatever the caller passes.
    ``k`` is clipped to the bank size. Ties in the vote go to the lowest class index. On a GPU the bank is held
    there in fp32 (ImageNet's 1.28 M ResNet-50 features: 10.5 GB), with the similarities of ``chunk`` queries to it
    at a time (1024: another 5.2 GB for ImageNet): 50,000 queries are 2.6e14 flops, seconds at a GPU's fp32 rate,
    minutes on a CPU (an estimate: not yet timed on a GPU); torch.cuda.OutOfMemoryError when that does not fit.
    """
    if len(train_feats) == 0:
        raise ValueError("knn_predict: the training bank is empty")
    if k < 1:
        raise ValueError(f"knn_predict: k={k} must be at least 1")
    if temperature <= 0:
        raise ValueError(f"knn_predict: temperature={temperature} must be positive")
    k = min(k, len(train_feats))
    n_classes = int(train_labels.max()) + 1 if n_classes is None else n_classes
    device = train_feats.device if device is None else torch.device(device)
    bank = train_feats.to(device, torch.float32)
    if bank.data_ptr() == train_feats.data_ptr():  # the caller's own tensor: normalised into a new one
        bank = F.normalize(bank, dim=1)
    else:  # a copy made here: normalised in place, so a large bank is held on the device once
        bank.div_(bank.norm(2, dim=1, keepdim=True).clamp_min_(1e-12))
    bank_labels = train_labels.long().to(bank.device)

    preds = []
    # Chunks bound the [chunk, N_train] similarity matrix; for ImageNet-sized banks the full one is too big.
    for start in range(0, len(test_feats), chunk):
        queries = F.normalize(test_feats[start : start + chunk].float().to(bank.device), dim=1)
        sims, idx = (queries @ bank.T).topk(k, dim=1)
        # Shifting by the row maximum leaves the vote unchanged but keeps exp() finite for small temperatures.
        weights = ((sims - sims[:, :1]) / temperature).exp()
        votes = torch.zeros(len(queries), n_classes, dtype=weights.dtype, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(preds).cpu()


def bank_knn(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int,
             temperature: float, n_classes: int, device: str | torch.device) -> torch.Tensor:
    """knn_predict on ``device``. Out of GPU memory, it tries smaller blocks of queries, then the CPU, with a note."""
    if torch.device(device).type == "cuda":
        for chunk in (1024, 256, 64):
            try:
                return knn_predict(train_feats, train_labels, test_feats, k, temperature, n_classes, chunk, device)
            except torch.cuda.OutOfMemoryError:
                pass  # leaving the except block frees the traceback, and with it the bank on the GPU
            torch.cuda.empty_cache()
        gib = train_feats.numel() * 4 / 2**30
        print(f"knn_eval: note: the kNN does not fit in {device}'s memory (the bank of {len(train_feats)} features is "
              f"{gib:.1f} GiB in fp32, plus 64 queries' similarities to it); it runs on the CPU (minutes for ImageNet)",
              file=sys.stderr)
        device = "cpu"
    return knn_predict(train_feats, train_labels, test_feats, k, temperature, n_classes, device=device)


def few_label_bank(labels: torch.Tensor | np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of exactly ``per_class`` randomly chosen samples of every class present in ``labels``."""
    labels = np.asarray(labels)
    chosen = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < per_class:
            raise ValueError(
                f"class {cls} has only {len(idx)} training images, fewer than per_class={per_class}"
            )
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def check_few_labels(train: str | Path, per_class: int, data) -> None:
    """ValueError naming ``--few-labels`` when a class of the ``--train`` data (``data``: its eval_dataset) has
    fewer than ``per_class`` images.

    Reads only the labels (listed with the dataset), so it runs before any feature is computed.
    """
    counts = np.bincount(np.asarray(data.targets, dtype=np.int64))
    present = np.flatnonzero(counts)  # few_label_bank draws from the classes that have images
    if not len(present):
        return
    smallest = int(present[np.argmin(counts[present])])
    if counts[smallest] < per_class:
        name = data.classes[smallest] if data.classes is not None else str(smallest)
        raise ValueError(f"--few-labels {per_class}: class {name!r} of --train {train} has only {counts[smallest]} "
                         f"images; pass --few-labels {counts[smallest]} or less (0 skips the few-label evaluation)")


def few_label_knn(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    per_class: int = 5,
    draws: int = 10,
    k: int = 20,
    temperature: float = 0.07,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """kNN top-1 (percent) with only ``per_class`` labelled images per class: (mean, std) over ``draws``.

    The std is the sample standard deviation across draws (0.0 for a single draw).
    """
    if draws < 1:
        raise ValueError(f"few_label_knn: draws={draws} must be at least 1")
    rng = np.random.default_rng(seed)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    accs = []
    for _ in range(draws):
        bank = torch.from_numpy(few_label_bank(train_labels.cpu().numpy(), per_class, rng))
        preds = knn_predict(train_feats[bank], train_labels[bank], test_feats, k, temperature, n_classes,
                            device=device)
        accs.append(accuracy(preds, test_labels))
    std = float(np.std(accs, ddof=1)) if draws > 1 else 0.0
    return float(np.mean(accs)), std


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (preds.cpu() == labels.cpu()).float().mean().item()


def folder_classes(folder: str | Path) -> list[str]:
    """The class names ImageFolder would find in ``folder`` (sorted subfolder names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; build the demo data with tools/make_demo_data.py"
        )
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Weighted kNN top-1 of frozen trunk features.")
    parser.add_argument("--trunk", required=True,
                        help="a trunk exported by train.py (RUN/trunk_<arch>.pth), a run's checkpoint "
                             "(RUN/checkpoints/ckpt_*.pth) or an official SwAV checkpoint")
    parser.add_argument("--arch", default=None,
                        help="torchvision architecture (default: read from the --trunk file's shapes)")
    parser.add_argument("--train", required=True, type=Path,
                        help="labelled bank: ImageFolder root or .beton written by tools/write_ffcv.py")
    parser.add_argument("--val", required=True, type=Path,
                        help="images to classify: ImageFolder root or .beton written by tools/write_ffcv.py")
    parser.add_argument(
        "--size", type=int, default=224, help="centre-crop size fed to the trunk (default 224)"
    )
    parser.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    parser.add_argument(
        "--temperature", type=float, default=0.07, help="vote weight exp(sim/T) (default 0.07)"
    )
    parser.add_argument("--few-labels", type=int, default=5,
                        help="labels per class of the few-label evaluation, at most the smallest --train class "
                             "(default 5; 0 skips it)")
    parser.add_argument(
        "--draws", type=int, default=10, help="random few-label banks to average (default 10)"
    )
    parser.add_argument("--baseline", help="also evaluate this trunk, any file --trunk takes (row named by "
                                           "--baseline-name)")
    parser.add_argument("--baseline-name", default="baseline",
                        help="row name for --baseline, e.g. 'random init' for a run's trunk_init_<arch>.pth")
    parser.add_argument(
        "--compare-random-init", action="store_true", help="also evaluate the arch at random init (seed 0)"
    )
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow trunk files with arbitrary pickled objects (runs code from the file)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_dist_timeout_argument(parser)
    args = parser.parse_args(argv)
    for name in ("k", "draws", "batch_size", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.few_labels < 0:
        parser.error(f"--few-labels {args.few_labels}: must be 0 (skip) or more")
    if args.temperature <= 0:
        parser.error(f"--temperature {args.temperature}: must be positive")
    problem = torchrun_device_problem(args.device)
    if problem:
        parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    console = Console()
    if not console.is_terminal:
        # Logs and CI capture: a fixed, wider width keeps the table's long column titles on one line.
        console = Console(width=120)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun (every rank shares the feature passes); else 0
    joined = []  # the process group, once joined
    try:
        return _evaluate_and_report(args, console, joined)
    except (FileNotFoundError, ValueError, DeviceError) as exc:
        print_error("knn_eval", exc)
        return 2  # a usage or data mistake, as train.py's config errors and argparse's
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback
        if rank == 0:
            print("knn_eval: interrupted", file=sys.stderr)
        return 130
    finally:
        if joined:
            shutdown()


def _evaluate_and_report(args: argparse.Namespace, console: Console, joined: list) -> int:
    """main's work: every trunk's features (each rank computes its share under torchrun), then on rank 0 the kNN,
    the table and the JSON. A process group joined is appended to ``joined``."""
    n_classes, notes = check_classes(args.train, args.val)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    for note in notes if main_rank else ():
        print(f"knn_eval: note: {note}", file=sys.stderr)
    # Load every trunk before the slow feature passes, so a bad --baseline fails in seconds. The --trunk file
    # names the architecture (unless --arch does); a --baseline must be of the same one.
    model, arch, _ = load_eval_trunk(args.trunk, args.arch, args.trust_pickle)
    models: list[tuple[str, str | None, nn.Module]] = [("trained", args.trunk, model)]
    if args.baseline:
        model, found, _ = load_eval_trunk(args.baseline, args.arch, args.trust_pickle, option="--baseline")
        if found != arch:
            raise ValueError(f"--baseline {args.baseline} holds a {found} trunk but --trunk a {arch}: compare "
                             "trunks of one architecture")
        models.append((args.baseline_name, args.baseline, model))
    if args.compare_random_init:
        models.append(("random init", None, load_eval_trunk(None, arch)[0]))
    # each listed once (an ImageNet folder scan takes a while), for every trunk
    train_set, val_set = eval_dataset(args.train, args.size, "--train"), eval_dataset(args.val, args.size, "--val")
    if args.few_labels:
        check_few_labels(args.train, args.few_labels, train_set)  # before the slow feature passes as well
    dist_info, device = eval_device(args.device, args.dist_timeout)
    if dist_info is not None:
        joined.append(dist_info)

    results = {}
    for name, path, model in models:
        train_feats, train_labels = extract_features(
            model, args.train, args.size, args.batch_size, args.workers, device, dist_info, train_set
        )
        val_feats, val_labels = extract_features(
            model, args.val, args.size, args.batch_size, args.workers, device, dist_info, val_set
        )
        if not main_rank:
            continue  # rank 0 has every feature and does the rest
        preds = bank_knn(train_feats, train_labels, val_feats, args.k, args.temperature, n_classes, device)
        row = {"trunk": path, "top1": accuracy(preds, val_labels)}
        if args.few_labels:
            mean, std = few_label_knn(
                train_feats,
                train_labels,
                val_feats,
                val_labels,
                per_class=args.few_labels,
                draws=args.draws,
                k=args.k,
                temperature=args.temperature,
                device=device,
            )
            row.update(few_label_mean=mean, few_label_std=std)
        results[name] = row
        n_train, n_val = len(train_labels), len(val_labels)
    if not main_rank:
        return 0

    table = Table(title=f"kNN on {arch} features: {n_train} train / {n_val} val images, {args.size}px")
    table.add_column("trunk")
    table.add_column(f"kNN top-1 (all {n_train} labels)", justify="right")
    if args.few_labels:
        table.add_column(
            f"kNN top-1 ({args.few_labels} labels/class, mean ± std over {args.draws} draws)", justify="right"
        )
    for name, row in results.items():
        cells = [name, f"{row['top1']:.2f}%"]
        if args.few_labels:
            cells.append(f"{row['few_label_mean']:.2f} ± {row['few_label_std']:.2f}%")
        table.add_row(*cells)
    console.print(table)
    # Plain lines as well, so logs can be grepped without parsing a table.
    for name, row in results.items():
        line = f"kNN top-1 {name}: {row['top1']:.2f}%"
        if args.few_labels:
            line += f" | {args.few_labels}-label: {row['few_label_mean']:.2f} ± {row['few_label_std']:.2f}%"
        print(line)

    if args.json:
        settings = {
            "arch": arch,
            "train": str(args.train),
            "val": str(args.val),
            "size": args.size,
            "k": args.k,
            "temperature": args.temperature,
            "few_labels": args.few_labels,
            "draws": args.draws,
            "n_train": n_train,
            "n_val": n_val,
            "n_classes": n_classes,
            "world_size": dist_info.world_size if dist_info else 1,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)
