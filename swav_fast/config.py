"""One typed configuration for a SwAV run.

Precedence: dataclass defaults < preset TOML (``--preset NAME`` or a path) < command-line flags.
Flags are generated from the fields, spelled as in the official main_swav.py (``--base_lr``) with a
hyphenated alias (``--base-lr``), so the algorithm's flags carry over; the official launch flags this command
line replaces (``--dump_path``, ``--dist_url``, ...) are named with their replacement. Every value is checked
before any work starts; a wrong key or value names the option and, for keys, the closest valid name.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"
TRUNKS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
PIPELINES = ("reference", "ffcv", "dali")
FFCV_ORDERS = ("random", "quasi_random")
RESAMPLERS = ("matmul", "roi_align")


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the option and what to do."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # ----- data -----
    data_path: str = _f("", "training images: an ImageFolder root (class sub-folders of JPEGs) for the reference "
                        "and dali pipelines, a .beton from tools/write_ffcv.py for ffcv")
    pipeline: str = _f("reference", "data pipeline: reference (PIL in worker processes), ffcv (.beton, batched "
                       "decode and crops on the device) or dali (NVIDIA DALI, GPU decode)", choices=PIPELINES)
    workers: int = _f(4, "data-loader workers per rank (reference: processes; ffcv: threads; dali: threads)")
    ffcv_order: str = _f("random", "ffcv sample order: random (DistributedSampler order, OS page cache) or "
                         "quasi_random (page-sharded, for a .beton larger than RAM)", choices=FFCV_ORDERS)
    gpu_resample: str = _f("matmul", "crop resampling of the ffcv pipeline: matmul (exact antialiased bilinear) or "
                           "roi_align (approximate, cheaper for large images)", choices=RESAMPLERS)
    nmb_crops: list[int] = _f([2, 6], "number of crops per resolution, large first")
    size_crops: list[int] = _f([224, 96], "crop side in pixels per resolution")
    min_scale_crops: list[float] = _f([0.14, 0.05], "RandomResizedCrop minimum area fraction per resolution")
    max_scale_crops: list[float] = _f([1.0, 0.14], "RandomResizedCrop maximum area fraction per resolution")
    color_jitter_strength: float = _f(1.0, "s of the official colour distortion: jitter (0.8s, 0.8s, 0.8s, 0.2s)")
    blur_prob: float = _f(0.5, "probability of the Gaussian blur per crop")
    # ----- model -----
    arch: str = _f("resnet50", "torchvision trunk", choices=TRUNKS)
    hidden_mlp: int = _f(2048, "projection head hidden width (0: a single linear layer)")
    feat_dim: int = _f(128, "embedding dimension")
    nmb_prototypes: int = _f(3000, "number of prototypes K")
    init_from: str = _f("", "initialise a fresh run from weights: an official swav .pth.tar, a swav_fast checkpoint "
                        "or a torchvision trunk (the head keeps its init where the file has none or another shape)")
    # ----- SwAV -----
    crops_for_assign: list[int] = _f([0, 1], "crop indices whose codes are computed (swapped prediction)")
    temperature: float = _f(0.1, "softmax temperature T of the loss")
    epsilon: float = _f(0.05, "Sinkhorn entropy regularisation eps")
    sinkhorn_iterations: int = _f(3, "Sinkhorn-Knopp iterations")
    queue_length: int = _f(0, "global queue length (0: no queue); trimmed to a multiple of the global batch")
    epoch_queue_starts: int = _f(15, "epoch at which the queue is created")
    freeze_prototypes_niters: int = _f(313, "iterations during which the prototypes are not updated")
    # ----- optimisation -----
    epochs: int = _f(100, "training epochs")
    batch_size: int = _f(64, "images per rank per step")
    base_lr: float = _f(4.8, "learning rate after warmup")
    final_lr: float = _f(0.0, "learning rate at the end of the cosine")
    warmup_epochs: int = _f(10, "linear warmup epochs")
    start_warmup: float = _f(0.0, "learning rate at the start of the warmup")
    wd: float = _f(1e-6, "weight decay (applied through LARC to every parameter)")
    momentum: float = _f(0.9, "SGD momentum")
    lars_trust: float = _f(0.001, "LARC trust coefficient")
    sync_bn: bool = _f(True, "SyncBatchNorm on CUDA with more than one rank (plain BN on CPU)")
    sync_bn_group_size: int = _f(0, "ranks per SyncBN group (0: all ranks; the bs4096 recipe uses 8)")
    precision: str = _f("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "bf16", "fp32"))
    channels_last: bool = _f(True, "channels_last memory format on CUDA (on CPU it is slower, so not used there)")
    sinkhorn_impl: str = _f("reference", "Sinkhorn: the pure-torch reference, or the fused Triton kernel (CUDA only)",
                            choices=("reference", "triton"))
    step_mode: str = _f("eager", "eager (DDP with several ranks); compile: the whole step (forward, backward, "
                        "gradient all-reduce, LARS, queue) as one torch.compile(fullgraph=True) graph; graph (CUDA "
                        "only): the same step captured once as a CUDA graph and replayed. Eager and graph give the "
                        "same numbers; compile's fused kernels round differently, as inductor does",
                        choices=("eager", "compile", "graph"))
    # ----- run -----
    run_dir: str = _f("runs/swav", "directory for checkpoints, metrics, config and the exported trunk")
    resume: str = _f("", "'auto': continue from run_dir's checkpoint (with the run's saved config.toml as the base "
                     "when no --preset is given); a path: that checkpoint (with the options it holds as the base "
                     "when no --preset is given, except its run_dir); '': fresh run", per_invocation=True)
    seed: int = _f(31, "seed of initialisation, data order and augmentation")
    log_every: int = _f(20, "steps per loss window: each is copied to the host without waiting and logged one "
                        "window later; signals and timed checkpoints are acted on at these steps")
    checkpoint_every_steps: int = _f(0, "also checkpoint every this many steps (0: at epoch ends only)")
    checkpoint_every_minutes: float = _f(30.0, "also checkpoint when this much time has passed since the last one "
                                         "(0: off)")
    keep_checkpoints: int = _f(3, "how many of the newest checkpoints to keep")
    checkpoint_freq: int = _f(0, "also keep the checkpoint of every this many epochs (and of the last epoch) for "
                                 "good, as checkpoints/epoch_<epochs done>.pth (0: none; main_swav.py keeps one every "
                                 "25 epochs)")
    collapse_margin: float = _f(0.02, "loss within this of ln K counts towards the collapse warning")
    collapse_window: int = _f(1000, "steps after the freeze window with the loss that close to ln K before the "
                              "collapse warning (0: off)")
    max_steps_per_epoch: int = _f(0, "cut each epoch to this many steps (0: the whole dataset); for smoke runs")
    stop_after_epoch: int = _f(0, "leave after this epoch with a checkpoint written (0: run to the end)",
                               per_invocation=True)
    device: str = _f("auto", "auto: cuda when available, else cpu", choices=("auto", "cuda", "cpu"))
    dist_timeout_minutes: float = _f(0.0, "with several ranks: how long a rank waits for the others in one "
                                     "collective before the run stops with a timeout error (0: torch's defaults, 10 "
                                     "minutes with NCCL, 30 with gloo); raise it where ranks may start minutes apart "
                                     "(a cold network file system)")

    # Derived at runtime, not options.
    @property
    def n_crops(self) -> int:
        return sum(self.nmb_crops)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def per_invocation(name: str) -> bool:
    """Whether an option belongs to one launch (--resume, --stop_after_epoch) rather than to the run: a resume does
    not take it from the saved config."""
    return bool(FIELDS[name].metadata.get("per_invocation"))


def _closest(name: str) -> str:
    """' (did you mean 'base_lr'?)' for a TOML key, '' when nothing is close."""
    match = difflib.get_close_matches(name.replace("-", "_"), FIELDS, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _closest_flag(flag: str) -> str:
    """' (did you mean '--base_lr'?)' for a command-line flag, spelled as the user spelled theirs (a hyphenated
    typo gets the hyphenated alias); '' when nothing is close."""
    name = flag.lstrip("-").split("=", 1)[0]
    prefix = "no-" if name[:3] in ("no-", "no_") else ""  # --no-sync_bn / --no-sync-bn of a boolean option
    name = name[len(prefix):]
    candidates = [k for k, f in FIELDS.items() if _base_type(f) is bool] if prefix else list(FIELDS)
    match = difflib.get_close_matches(name.replace("-", "_"), candidates, n=1, cutoff=0.5)
    if not match:
        return ""
    suggestion = match[0].replace("_", "-") if "-" in name else match[0]
    return f" (did you mean '--{prefix}{suggestion}'?)"


def _base_type(f: dataclasses.Field) -> Any:
    return typing.get_type_hints(Config)[f.name]


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check a TOML value against the field's type; ints are accepted for floats."""
    tp = _base_type(FIELDS[name])
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{name}' must be a list of {item.__name__}, got {value!r}")
        return [_coerce_scalar(name, v, item, where) for v in value]
    return _coerce_scalar(name, value, tp, where)


def _coerce_scalar(name: str, value: Any, tp: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{where}: '{name}' must be {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: '{name}' must be {tp.__name__}, got {value!r}")
    return value


def preset_path(preset: str) -> Path:
    p = Path(preset)
    if p.suffix == ".toml":
        if not p.is_file():
            raise ConfigError(f"--preset: file {p} does not exist")
        return p
    p = PRESET_DIR / f"{preset}.toml"
    if not p.is_file():
        names = sorted(q.stem for q in PRESET_DIR.glob("*.toml"))
        match = difflib.get_close_matches(preset, names, n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ConfigError(f"--preset: unknown preset '{preset}'{hint}; available: {', '.join(names)}")
    return p


def load_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    out = {}
    for key, value in raw.items():
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown key '{key}'{_closest(key)}")
        out[key] = _coerce(key, value, str(path))
    return out


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Reject impossible values before any work; returns cfg (unchanged)."""

    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"--{name}={getattr(cfg, name)!r}: {why}")

    for name in ("nmb_crops", "size_crops", "min_scale_crops", "max_scale_crops"):
        if len(getattr(cfg, name)) != len(cfg.nmb_crops):
            raise bad(name, f"needs one value per resolution ({len(cfg.nmb_crops)}, as --nmb_crops)")
    if any(n < 1 for n in cfg.nmb_crops):
        raise bad("nmb_crops", "every resolution needs at least one crop")
    if any(s < 1 for s in cfg.size_crops):
        raise bad("size_crops", "crop sizes must be positive")
    for lo, hi in zip(cfg.min_scale_crops, cfg.max_scale_crops, strict=True):
        if not 0 < lo <= hi <= 1:
            raise bad("min_scale_crops", f"needs 0 < min <= max <= 1 per resolution (got {lo} and {hi})")
    if cfg.n_crops < 2:
        raise bad("nmb_crops", "swapped prediction needs at least 2 crops in all")
    if not cfg.crops_for_assign or len(set(cfg.crops_for_assign)) != len(cfg.crops_for_assign):
        raise bad("crops_for_assign", "needs distinct crop indices")
    for i in cfg.crops_for_assign:
        if not 0 <= i < cfg.n_crops:
            raise bad("crops_for_assign",
                      f"index {i} is out of range: there are {cfg.n_crops} crops (0..{cfg.n_crops - 1})")
    for name in ("temperature", "epsilon"):
        if not getattr(cfg, name) > 0:
            raise bad(name, "must be > 0")
    for name in ("sinkhorn_iterations", "epochs", "batch_size", "nmb_prototypes", "feat_dim", "log_every",
                 "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be >= 1")
    for name in ("workers", "hidden_mlp", "queue_length", "epoch_queue_starts", "freeze_prototypes_niters",
                 "warmup_epochs", "max_steps_per_epoch", "stop_after_epoch", "sync_bn_group_size",
                 "checkpoint_every_steps", "checkpoint_freq", "collapse_window"):
        if getattr(cfg, name) < 0:
            raise bad(name, "must be >= 0")
    if cfg.warmup_epochs > cfg.epochs:
        raise bad("warmup_epochs", f"is longer than the run (--epochs {cfg.epochs})")
    for name in ("base_lr", "final_lr", "start_warmup", "wd", "lars_trust", "momentum", "blur_prob",
                 "color_jitter_strength", "checkpoint_every_minutes", "collapse_margin",
                 "dist_timeout_minutes"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise bad(name, "must be a finite number >= 0")
    if cfg.final_lr > cfg.base_lr:
        raise bad("final_lr", f"is above --base_lr {cfg.base_lr}: the cosine would raise the learning rate over the "
                  "run; were the two swapped? (the official recipes end at base_lr / 1000)")
    if cfg.blur_prob > 1:
        raise bad("blur_prob", "is a probability: 0..1")
    if cfg.queue_length > 0:
        global_batch = cfg.batch_size * world_size
        if cfg.queue_length < global_batch:
            raise bad("queue_length", f"is shorter than the global batch {global_batch} "
                      f"(batch_size {cfg.batch_size} x {world_size} ranks); use 0 (no queue) or >= {global_batch}")
    if world_size > 1 and cfg.sync_bn_group_size > 0 and world_size % cfg.sync_bn_group_size != 0:
        raise bad("sync_bn_group_size", f"must divide the number of ranks ({world_size}); "
                  "0 synchronises BatchNorm over all ranks")
    if cfg.stop_after_epoch > cfg.epochs:
        raise bad("stop_after_epoch", f"is past --epochs ({cfg.epochs})")
    return cfg


def trimmed_queue_length(cfg: Config, world_size: int) -> int:
    """Official rule: the queue length is cut down to a multiple of the global batch."""
    global_batch = cfg.batch_size * world_size
    return cfg.queue_length - cfg.queue_length % global_batch


# ----------------------------------------------------------------------------- command line


_LAUNCHER = "not needed: torchrun sets up the ranks"
# official main_swav.py flags that this command line spells otherwise or does not need: what to pass instead
OFFICIAL_FLAGS = {
    "dump_path": "here: --run_dir",
    "use_fp16": "here: --precision, bf16 autocast on CUDA by default",
    "syncbn_process_group_size": "here: --sync_bn_group_size",
    "dist_url": _LAUNCHER,
    "world_size": _LAUNCHER,
    "rank": _LAUNCHER,
}
SYNC_BN_KINDS = ("apex", "pytorch")  # the official --sync_bn takes one of these; here it is a switch


def _unrecognized_hint(arg: str) -> str:
    """An unrecognized command-line word with what to pass instead, where that is known."""
    name = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
    if arg.startswith("--") and name in OFFICIAL_FLAGS:
        return f"{arg} (main_swav.py's flag; {OFFICIAL_FLAGS[name]})"
    if arg.startswith("--"):
        return f"{arg}{_closest_flag(arg)}"
    if arg in SYNC_BN_KINDS:
        return f"{arg} (--sync_bn is a switch here, on by default: PyTorch's SyncBatchNorm)"
    return arg


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message = prefix + " ".join(_unrecognized_hint(a) for a in message[len(prefix):].split())
        super().error(message)


def _flag_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return item, {"nargs": "+"}
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if isinstance(tp, types.UnionType):
        raise TypeError(tp)
    return tp, {}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        description="SwAV pretraining. Single process: python train.py ...; "
        "several: torchrun --nproc_per_node=N train.py ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--preset", default=None,
                   help="preset name (" + ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.toml")))
                   + ") or a path to a .toml file")
    for f in dataclasses.fields(Config):
        tp, extra = _flag_type(_base_type(f))
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if tp is not None:
            kw["type"] = tp
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw["help"] += f" (default: {default})"
        p.add_argument(*names, **kw, **extra)
    # torch.distributed.launch passes each process --local-rank=N (older versions --local_rank); the environment
    # (LOCAL_RANK, as under torchrun) says the same, and that is what train.py reads
    p.add_argument("--local-rank", "--local_rank", dest="launcher_local_rank", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    return p


def parse_config(argv: list[str] | None = None, world_size: int = 1) -> Config:
    """Defaults, then the preset, then the flags; validated."""
    args = vars(build_parser().parse_args(argv))
    args.pop("launcher_local_rank", None)
    preset = args.pop("preset")
    values: dict[str, Any] = load_toml(preset_path(preset)) if preset else {}
    values.update(args)
    if values.get("resume") and not preset:
        # `train.py --run_dir R --resume auto` continues R with the config it was started with, and
        # `--resume PATH` that checkpoint's run with the config it holds; flags override either.
        values = {**resumed_config(values["resume"], values.get("run_dir", Config.run_dir)), **args}
    return validate(Config(**values), world_size)


def resumed_config(resume: str, run_dir: str) -> dict[str, Any]:
    """The options a resume starts from when no --preset is given, per-invocation ones left out: for 'auto', those
    of run_dir's config.toml; for a swav_fast checkpoint file, those it was written with, less its run_dir (the
    run directory is where this launch writes: given by --run_dir, or the default). {} when there is no such file,
    or the file is not a swav_fast checkpoint (train.py then says what is wrong with it)."""
    if resume == "auto":
        saved = Path(run_dir) / "config.toml"
        values = load_toml(saved) if saved.is_file() else {}
    else:
        values = _checkpoint_config(Path(resume))
        values.pop("run_dir", None)
    return {k: v for k, v in values.items() if k in FIELDS and not per_invocation(k)}


def _checkpoint_config(path: Path) -> dict[str, Any]:
    """The config dict a swav_fast checkpoint holds, read without loading its tensors (memory-mapped); {} for
    anything else."""
    if not path.is_file():
        return {}
    import torch  # here: the rest of this module (and train.py --help) does without it

    from swav_fast.checkpoint import FORMAT

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - a foreign or damaged file: train.py's load names the problem
        return {}
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("config"), dict):
        return {}
    return dict(state["config"])


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that load_toml reads back (all values are scalars or flat lists)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    return "".join(f"{k} = {fmt(v)}\n" for k, v in dataclasses.asdict(cfg).items())
