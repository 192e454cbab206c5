"""Official facebookresearch/swav checkpoints: read them, load them into SwAVModel, export torchvision trunks.

The released files (``swav_800ep_pretrain.pth.tar`` and friends) are a DistributedDataParallel state_dict,
either bare or under a ``"state_dict"`` key (the training checkpoints, beside ``optimizer`` and ``amp``), with
every key prefixed by ``module.``. Without the prefix the keys are exactly SwAVModel's (REFERENCE section 1):
torchvision trunk keys at the top level, ``projection_head.{0,1,3}.*`` and ``prototypes.weight``. Eval-only
exports may lack the prototypes (or the whole head); runs with several prototype sets (``MultiPrototypes``,
keys ``prototypes.prototypes0.weight`` ...) are not supported here and say so.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs. The
numpy arrays in a swav_fast checkpoint's RNG state are allowed explicitly; anything else needs
``trust_pickle=True`` (``--trust-pickle``), which runs the file's pickled code and is only for files you trust.

Usage::

    python -m swav_fast.interop info swav_800ep_pretrain.pth.tar
    python -m swav_fast.interop export swav_800ep_pretrain.pth.tar trunk_resnet50.pth [--force]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import pickle
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision

from swav_fast.checkpoint import FORMAT as SWAV_FAST_FORMAT
from swav_fast.checkpoint import export_trunk
from swav_fast.model import HEAD_PREFIXES, SwAVModel, trunk_state_dict

# torchvision architectures whose trunk layout infer_config recognises, checked in this order.
KNOWN_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
)
# The numpy objects a swav_fast checkpoint's RNG state pickles (np.random.get_state() holds an ndarray).
_NUMPY_SAFE_GLOBALS = (
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)


class InteropError(ValueError):
    """A checkpoint that cannot be read, recognised or loaded; the message names the file or key."""


@dataclass
class LoadReport:
    """What load_into_swav_model did: keys copied, model keys absent from the file (left at initialisation),
    file keys the model lacks, and head keys not copied because their shape differs (strict_head=False)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} tensors"
        if self.missing:
            text += f"; left at initialisation: {_short_list(self.missing)}"
        if self.unexpected:
            text += f"; ignored from the file: {_short_list(self.unexpected)}"
        if self.skipped:
            text += f"; other shape, not loaded: {_short_list(self.skipped)}"
        return text


def _short_list(keys: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _numpy_globals() -> list:
    found = []
    for name in _NUMPY_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return found


def _unpickler_detail(exc: Exception) -> str:
    """The one informative line of torch's long weights_only message ("Unsupported operand 103", ...)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[-1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[0] if lines else type(exc).__name__


def _torch_load(path: Path, trust_pickle: bool) -> object:
    if not path.is_file():
        raise InteropError(f"checkpoint {path} does not exist")
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsupported = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if not unsupported:  # weights_only also fails this way on a file that is no torch checkpoint at all
            raise InteropError(f"{path} cannot be read as a torch checkpoint (truncated, or not a torch.save "
                               f"file): {_unpickler_detail(exc)}") from exc
        raise InteropError(
            f"{path} holds pickled Python objects other than tensors (it needs {unsupported[0]}). Loading it would run "
            "code from the file: if you trust it, pass --trust-pickle (trust_pickle=True)"
        ) from exc
    except Exception as exc:  # truncated download, not a torch file, ...
        raise InteropError(f"{path} cannot be read as a torch checkpoint ({type(exc).__name__}: {exc})") from exc


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict without ``module.``, kind) from an official, swav_fast or torchvision-trunk file.

    kind is ``"official"`` (a ``module.``-prefixed or ``{"state_dict": ...}`` file, or a bare one with head
    keys), ``"swav_fast"`` (a train.py checkpoints/ckpt_*.pth: its ``"model"`` entry) or ``"torchvision"`` (a plain
    trunk state_dict, as train.py and ``export`` write).
    """
    path = Path(path)
    obj = _torch_load(path, trust_pickle)
    if not isinstance(obj, dict):
        raise InteropError(f"{path} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    if obj.get("format") == SWAV_FAST_FORMAT:
        state, kind = obj.get("model"), "swav_fast"
    elif "state_dict" in obj:
        state, kind = obj["state_dict"], "official"
    else:
        state, kind = obj, None
    if not isinstance(state, dict) or not state:
        raise InteropError(f"{path}: the model state is empty or not a dict (found {type(state).__name__})")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InteropError(
            f"{path} is not a state_dict of tensors: {_short_list([str(k) for k in not_tensors])} are not tensors "
            f"(top-level keys: {_short_list([str(k) for k in obj])})"
        )
    if kind is None:
        prefixed = any(k.startswith("module.") for k in state)
        kind = "official" if prefixed or any(k.startswith(HEAD_PREFIXES) for k in state) else "torchvision"
    state = {k.removeprefix("module."): v for k, v in state.items()}
    multi = sorted(k for k in state if k.startswith("prototypes.prototypes"))
    if multi:
        raise InteropError(
            f"{path} has several prototype sets (MultiPrototypes: {_short_list(multi)}), which swav_fast does not "
            "support (nmb_prototypes is one number). To use its trunk, save the state_dict again without the "
            "prototypes.* keys and pass that file"
        )
    return state, kind


def read_official(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict of an official SwAV checkpoint (bare or ``{"state_dict": ...}``), ``module.`` removed."""
    return read_checkpoint(path, trust_pickle)[0]


@functools.cache
def _meta_trunk(arch: str) -> tuple[dict[str, torch.Size], int]:
    """(trunk key -> shape, pooled feature width) of torchvision ``arch``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None)
    shapes = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}
    return shapes, model.fc.in_features


def _describe_trunk(trunk: dict[str, torch.Tensor]) -> str:
    blocks = []
    for layer in range(1, 5):
        ids = {int(k.split(".")[1]) for k in trunk if k.startswith(f"layer{layer}.") and k.split(".")[1].isdigit()}
        blocks.append(len(ids))
    bottleneck = any(k.endswith(".conv3.weight") for k in trunk)
    stem = trunk["conv1.weight"].shape[0] if "conv1.weight" in trunk else None
    text = f"{'bottleneck' if bottleneck else 'basic-block'} ResNet, blocks per stage {blocks}, stem width {stem}"
    if bottleneck and blocks == [3, 4, 6, 3] and stem and stem > 64 and stem % 64 == 0:
        text += f": the official resnet50w{stem // 64}, which has no torchvision equivalent"
    return text


def infer_arch(trunk: dict[str, torch.Tensor]) -> str:
    """The torchvision architecture whose trunk has exactly these keys and shapes (``num_batches_tracked``
    and ``fc.*`` aside); InteropError describing the layout when none does."""
    keys = {k: v.shape for k, v in trunk.items() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    if "conv1.weight" not in keys or not any(k.startswith("layer4.") for k in keys):
        raise InteropError(f"no ResNet trunk in this state_dict (keys: {_short_list(sorted(keys))})")
    for arch in KNOWN_ARCHS:
        expected = {k: s for k, s in _meta_trunk(arch)[0].items() if not k.endswith("num_batches_tracked")}
        if expected == keys:
            return arch
    raise InteropError(f"the trunk matches no torchvision architecture: {_describe_trunk(trunk)}")


def infer_config(state: dict[str, torch.Tensor]) -> dict:
    """SwAV model settings read from the shapes: arch, num_features, hidden_mlp, feat_dim, nmb_prototypes.

    ``state`` has no ``module.`` prefix (read_official's output). hidden_mlp is 0 for a single-Linear head;
    feat_dim / hidden_mlp are None without a projection head and nmb_prototypes is None without prototypes.
    """
    trunk = trunk_state_dict(state)
    arch = infer_arch(trunk)
    num_features = _meta_trunk(arch)[1]
    if "projection_head.0.weight" in state:
        hidden_mlp = state["projection_head.0.weight"].shape[0]
        feat_dim = state["projection_head.3.weight"].shape[0] if "projection_head.3.weight" in state else None
    elif "projection_head.weight" in state:
        hidden_mlp, feat_dim = 0, state["projection_head.weight"].shape[0]
    else:
        hidden_mlp = feat_dim = None
    protos = state.get("prototypes.weight")
    return {
        "arch": arch,
        "num_features": int(num_features),
        "hidden_mlp": hidden_mlp,
        "feat_dim": feat_dim,
        "nmb_prototypes": None if protos is None else int(protos.shape[0]),
    }


def load_into_swav_model(
    state: dict[str, torch.Tensor], model: SwAVModel, strict_head: bool = True, source: str | Path | None = None
) -> LoadReport:
    """Copy ``state`` (official layout, ``module.`` optional) into ``model``; returns what was loaded.

    Every trunk tensor must be present with the model's shape; a shape mismatch is an InteropError naming the
    key, both shapes and ``source`` (the file) when given. With ``strict_head`` the head (projection_head.*,
    prototypes.*) must match exactly as well. Without it, head tensors that are absent or of another shape
    (another K, say) keep the model's initialisation and are listed in the report (``missing`` / ``skipped``),
    which is what initialising a run or an evaluation from an eval-only export needs.
    """
    where = f"{source}: " if source is not None else ""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    report = LoadReport()
    mismatched = []
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif v.shape != own[k].shape:
            if not strict_head and k.startswith(HEAD_PREFIXES):
                report.skipped.append(k)
            else:
                mismatched.append(f"{k} has shape {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model")
        else:
            report.loaded.append(k)
    report.missing = [k for k in own if k not in state]
    if mismatched:
        raise InteropError(
            f"{where}shape mismatch: {_short_list(mismatched, 3)}. Build the model with the checkpoint's settings "
            f"(python -m swav_fast.interop info FILE prints arch, hidden_mlp, feat_dim and nmb_prototypes)"
        )
    # num_batches_tracked only counts BN updates (absent from some old exports); it never changes an output.
    bad_missing = [k for k in report.missing if not k.endswith("num_batches_tracked")]
    bad_unexpected = report.unexpected
    if not strict_head:
        bad_missing = [k for k in bad_missing if not k.startswith(HEAD_PREFIXES)]
        bad_unexpected = [k for k in bad_unexpected if not k.startswith(HEAD_PREFIXES)]
    if bad_missing or bad_unexpected:
        parts = []
        if bad_missing:
            parts.append(f"missing from the file: {_short_list(bad_missing)}")
        if bad_unexpected:
            parts.append(f"not in the model: {_short_list(bad_unexpected)}")
        if all(k.startswith(HEAD_PREFIXES) for k in bad_missing + bad_unexpected):
            hint = "the heads differ: strict_head=False loads the trunk and keeps the model's head"
        else:
            hint = f"the model is a {model.arch}; the file may hold another architecture"
        raise InteropError(f"{where}{'; '.join(parts)} ({hint})")
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def model_from_state(state: dict[str, torch.Tensor], source: str | Path | None = None,
                     strict_head: bool = False) -> tuple[SwAVModel, LoadReport, dict]:
    """A SwAVModel built with infer_config's settings and loaded from ``state``: (model, report, config).

    Without a projection head in the file the model gets a small placeholder one (never loaded, listed as
    missing); without prototypes it gets a single placeholder prototype.
    """
    cfg = infer_config(state)
    model = SwAVModel(
        cfg["arch"],
        hidden_mlp=cfg["hidden_mlp"] if cfg["hidden_mlp"] is not None else 0,
        feat_dim=cfg["feat_dim"] if cfg["feat_dim"] is not None else 1,
        n_prototypes=cfg["nmb_prototypes"] or 1,
    )
    report = load_into_swav_model(state, model, strict_head=strict_head, source=source)
    return model, report, cfg


def official_to_torchvision(path_in: str | Path, path_out: str | Path, trust_pickle: bool = False) -> dict:
    """Write the trunk of ``path_in`` in torchvision layout to ``path_out``; returns infer_config's dict.

    ``torchvision.models.<arch>().load_state_dict(torch.load(path_out), strict=False)`` then reports only
    ``fc.weight`` / ``fc.bias`` missing (checked here before writing).
    """
    state, _ = read_checkpoint(path_in, trust_pickle)
    model, _, cfg = model_from_state(state, source=path_in, strict_head=False)
    trunk = trunk_state_dict(model.state_dict())
    check = torchvision.models.get_model(cfg["arch"], weights=None)
    result = check.load_state_dict(trunk, strict=False)
    if result.unexpected_keys or any(not k.startswith("fc.") for k in result.missing_keys):  # defensive
        raise InteropError(f"{path_in}: the exported trunk does not fit torchvision {cfg['arch']}: {result}")
    path_out = Path(path_out)
    try:
        path_out.parent.mkdir(parents=True, exist_ok=True)
        export_trunk(model.state_dict(), path_out)
    except OSError as e:  # a parent that is a file, permissions, a full disk
        raise InteropError(f"cannot write {path_out} ({type(e).__name__}: {e}); choose a path this user can write, "
                           "with free space") from None
    return cfg


def describe(path: str | Path, trust_pickle: bool = False) -> dict:
    """What ``info`` prints: kind, inferred settings and tensor/parameter counts of a checkpoint file."""
    state, kind = read_checkpoint(path, trust_pickle)
    cfg = infer_config(state)
    trunk = trunk_state_dict(state)
    return {
        "file": str(path),
        "kind": kind,
        **cfg,
        "tensors": len(state),
        "trunk_parameters": sum(v.numel() for k, v in trunk.items() if not k.endswith(("running_mean", "running_var",
                                                                                       "num_batches_tracked"))),
        "head_modules": sorted({k.rsplit(".", 1)[0] for k in state if k.startswith(HEAD_PREFIXES)}),
    }


def _check_export_output(checkpoint: Path, out: Path, force: bool) -> None:
    """``export`` refuses to replace an existing file without --force, and never replaces the file it reads."""
    if out.is_dir():
        raise InteropError(f"output {out} is a directory: pass the path of the trunk file to write")
    if not out.exists():
        return
    if checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise InteropError(f"output {out} is the checkpoint being read: pass another output path")
    if not force:
        raise InteropError(f"output {out} already exists; it was left untouched (pass --force to overwrite it)")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m swav_fast.interop",
        description="Official SwAV checkpoints (swav_800ep_pretrain.pth.tar, ...): inspect, export the trunk.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the architecture and head settings read from the shapes")
    info.add_argument("checkpoint", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    export = sub.add_parser("export", help="write the trunk as a torchvision state_dict (only fc.* missing)")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path, help="the trunk file to write")
    export.add_argument("--force", action="store_true", help="overwrite an existing output file")
    for p in (info, export):
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow arbitrary pickled objects (runs code from the file; only for files you trust)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command == "info":
            info = describe(args.checkpoint, args.trust_pickle)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                width = max(len(k) for k in info)
                for k, v in info.items():
                    if k == "head_modules":
                        v = ", ".join(v) or "(none: trunk only)"
                    print(f"{k:<{width}}  {v}")
        else:
            _check_export_output(args.checkpoint, args.out, args.force)  # before the (possibly long) read
            cfg = official_to_torchvision(args.checkpoint, args.out, args.trust_pickle)
            print(f"wrote {args.out}: {cfg['arch']} trunk ({cfg['num_features']}-d features). Load it with "
                  f"torchvision.models.{cfg['arch']}().load_state_dict(torch.load('{args.out}'), strict=False)")
    except InteropError as exc:
        print(f"interop: error: {exc}", file=sys.stderr)
        return 2  # a usage or file mistake, as argparse's and the other tools'
    return 0


if __name__ == "__main__":
    sys.exit(main())
