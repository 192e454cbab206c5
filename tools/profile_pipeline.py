"""Pipeline profiler: every available multi-crop pipeline on the same images, side by side, plus the host cost.

    python tools/profile_pipeline.py --data data/demo/photos/train                    # CPU, all pipelines
    python tools/profile_pipeline.py --data /imagenet/train --beton /data/train.beton --device cuda

Table 1 (throughput): for each pipeline (reference = the official PIL chain in DataLoader workers, the baseline;
ffcv = .beton bytes -> one batched decode_jpeg -> gpu_augment; dali = NVIDIA DALI), after --warmup batches, the
wall time of --batches batches: samples/s, crops/s, ms per batch, and for ffcv the split between decode and
augmentation (timed separately, with a device sync between the two on CUDA: the split costs a little speed).
The first row, "decode+augment", is the ffcv path's device work alone on the bytes a .beton would hold (each file
as tools/write_ffcv.py stores it: long side at most 512), already in memory: what the GPU has to sustain,
measurable where ffcv is not installed (the GPU machine).

Table 2 (host cost per sample, the figure that says whether a GPU run is CPU-bound): the CPU time (process time,
all threads) the FFCV path spends per sample with the device work excluded: FFCV's Loader copying the bytes out of
the memory-mapped .beton, cutting and packing them into one staging buffer (pinned on CUDA, plain memory here),
and sampling every crop's parameters (done on the device in training; here on the CPU, an upper bound). Beside it,
the reference chain's CPU time per sample on one thread (decode + 8 PIL augmentation chains), which is what the
official loader pays per sample, and the DALI path's host side (file read, header check, crop parameters; the
files come from the page cache after the first pass). Target: <= 0.1 ms per sample per core.

The .beton is written from --data into a temporary folder when --beton is not given (tools/write_ffcv.py).
Crops default to the bs256 recipe (2x224 at scale 0.14-1, 6x96 at 0.05-0.14).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipelines  # noqa: E402
from pipelines.spec import CropGroup, MultiCropSpec  # noqa: E402
from swav_fast.config import Config  # noqa: E402
from swav_fast.streams import private_stream  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def across_epochs(loader, batches_of, n: int) -> Iterator[tuple[int, object]]:
    """(epoch, item) for the first n items of `batches_of()` over epochs 0, 1, ... (loader.set_epoch before each):
    a timing run longer than one epoch chains epochs."""
    epoch = done = 0
    while True:
        loader.set_epoch(epoch)
        it = batches_of()
        try:
            for item in it:
                yield epoch, item
                done += 1
                if done >= n:
                    return
        finally:
            if hasattr(it, "close"):
                it.close()  # ffcv: ends its epoch iterator's thread now
        epoch += 1


def time_loader(loader, device: torch.device, batches: int, warmup: int) -> dict:
    """Wall time of `batches` batches after `warmup`."""
    n_img = n_crops = 0
    for k, (_, batch) in enumerate(across_epochs(loader, lambda: iter(loader), batches + warmup)):
        if k == warmup - 1:
            _sync(device)
            t0 = time.perf_counter()
        elif k >= warmup:
            n_img += batch.batch_size
            n_crops += batch.batch_size * len(batch.crops)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"samples_per_s": n_img / dt, "crops_per_s": n_crops / dt, "ms_per_batch": 1000 * dt / batches}


def time_ffcv_split(loader, device: torch.device, batches: int, warmup: int) -> dict:
    """ffcv: host side, decode and augmentation timed separately (device synced after each phase)."""
    from pipelines.gpu_augment import augment_generator

    t_host = t_dec = t_aug = 0.0
    items = across_epochs(loader, loader.host_batches, batches + warmup)
    for k in range(batches + warmup):
        t0 = time.perf_counter()
        epoch, (step, data, idx) = next(items)
        t1 = time.perf_counter()
        images, _ = loader.decode(data, idx)
        _sync(device)
        t2 = time.perf_counter()
        loader.augment(images, augment_generator(0, epoch, 0, step, device))
        _sync(device)
        t3 = time.perf_counter()
        if k >= warmup:
            t_host, t_dec, t_aug = t_host + t1 - t0, t_dec + t2 - t1, t_aug + t3 - t2
    return {"host_ms_per_batch": 1000 * t_host / batches, "decode_ms_per_batch": 1000 * t_dec / batches,
            "augment_ms_per_batch": 1000 * t_aug / batches}


def time_device_side(data: str, spec: MultiCropSpec, device: torch.device, batch: int, batches: int, warmup: int,
                     resample: str) -> dict:
    """The device work of the ffcv path alone (decode_jpeg of a batch + gpu_augment), on the bytes a .beton written
    from the ImageFolder by tools/write_ffcv.py (default max_side) would hold, prepared in memory beforehand: what
    the GPU must sustain, measurable without ffcv installed. (Decoding the original files instead would time
    ImageNet's rare multi-megapixel images at full size, and the padded resampling grows with the batch's largest
    image.) A file PIL cannot open is kept as it is if it looks like a JPEG, so the decoder's replacement of
    undecodable samples is timed too."""
    from PIL import Image

    from pipelines.ffcv import decode_rgb, replace_undecodable  # (needs no ffcv)
    from pipelines.gpu_augment import GPUMultiCrop, augment_generator
    from pipelines.reference import scan_image_folder
    from tools.write_ffcv import stored_bytes

    blobs = []
    for path, _ in scan_image_folder(data)[0]:
        b = Path(path).read_bytes()
        try:
            b = stored_bytes(b)
        except (OSError, ValueError, Image.DecompressionBombError):  # OSError includes PIL's UnidentifiedImageError
            if b[:2] != b"\xff\xd8":
                continue
        blobs.append(torch.frombuffer(bytearray(b), dtype=torch.uint8))
        if len(blobs) >= batch * (batches + warmup):
            break
    if not blobs:
        raise ValueError(f"no image files in {data}")
    augment = GPUMultiCrop(spec, resample=resample)
    stream = private_stream(device) if device.type == "cuda" else None  # as FFCVLoader decodes
    t_dec = t_aug = 0.0
    for k in range(batches + warmup):
        data_k = [blobs[(k * batch + j) % len(blobs)] for j in range(batch)]
        t0 = time.perf_counter()
        decoded = decode_rgb(data_k, device, stream)
        images = replace_undecodable(decoded)  # as the loader replaces them
        if images is None:
            raise ValueError(f"no JPEG of batch {k} from {data} could be decoded on {device}: {decoded[0]}")
        _sync(device)
        t1 = time.perf_counter()
        augment(images, augment_generator(0, 0, 0, k, device))
        _sync(device)
        t2 = time.perf_counter()
        if k >= warmup:
            t_dec, t_aug = t_dec + t1 - t0, t_aug + t2 - t1
    dt = t_dec + t_aug
    return {"pipeline": "decode+augment", "samples_per_s": batch * batches / dt,
            "crops_per_s": batch * batches * spec.n_crops / dt, "ms_per_batch": 1000 * dt / batches,
            "decode_ms_per_batch": 1000 * t_dec / batches, "augment_ms_per_batch": 1000 * t_aug / batches}


def ffcv_host_cost(loader, batches: int, warmup: int) -> dict:
    """CPU time per sample of the FFCV host path with no device work: Loader bytes, pack into a staging buffer,
    crop-parameter sampling (on the CPU here; on the device in training)."""
    from pipelines.ffcv import pack_rows
    from pipelines.gpu_augment import augment_generator

    sizes_hw = _image_sizes(loader)
    staging = torch.empty(1 << 20, dtype=torch.uint8)
    n = 0
    for k, (epoch, (step, rows, idx)) in enumerate(across_epochs(loader, loader.raw_batches, batches + warmup)):
        if k == warmup:
            cpu0, wall0 = time.process_time(), time.perf_counter()
        sizes = loader.sizes[idx]
        if staging.numel() < sizes.sum():
            staging = torch.empty(2 * int(sizes.sum()), dtype=torch.uint8)
        pack_rows(rows, sizes, staging)
        loader.augment.sample_params(torch.from_numpy(sizes_hw[idx]), augment_generator(0, epoch, 0, step, "cpu"))
        if k >= warmup:
            n += len(idx)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"cpu_ms_per_sample": 1000 * cpu / n, "wall_ms_per_sample": 1000 * wall / n, "samples": n}


def dali_host_cost(loader, batches: int, warmup: int) -> dict:
    """CPU time per sample of the DALI path's host side in the training process (pipelines/dali.py prepares each
    step there: read the file, check its header, draw the crop parameters, pack them for DALI); DALI's own
    decoding and crops are excluded (on the GPU in training)."""
    def steps():
        order = list(loader.sampler)  # the epoch's order (set_epoch was called)
        return ((order, step) for step in range(loader.steps))

    n = 0
    for k, (_, (order, step)) in enumerate(across_epochs(loader, steps, batches + warmup)):
        if k == warmup:
            cpu0, wall0 = time.process_time(), time.perf_counter()
        loader._prepare(order, step)
        if k >= warmup:
            n += loader.batch_size
    return {"cpu_ms_per_sample": 1000 * (time.process_time() - cpu0) / n,
            "wall_ms_per_sample": 1000 * (time.perf_counter() - wall0) / n, "samples": n}


def _image_sizes(loader) -> np.ndarray:
    """(height, width) of every sample of the .beton, from the JPEG frame headers (write_ffcv stores JPEGs only)."""
    from pipelines.jpeg import jpeg_frame
    from tools.write_ffcv import read_beton_bytes

    out = np.zeros((loader.num_samples, 2), dtype=np.int64)
    for data, _, i in read_beton_bytes(loader.beton):
        frame = jpeg_frame(data)
        out[i] = (frame.height, frame.width)
    return out


def reference_host_cost(cfg: Config, spec: MultiCropSpec, samples: int) -> dict:
    """CPU time per sample of the reference chain in the calling process (one thread: decode + every crop)."""
    from pipelines.reference import MultiCropDataset

    ds = MultiCropDataset(cfg.data_path, spec, cfg.seed)
    n = min(samples, len(ds))
    _ = ds[0]  # warm-up (imports, first file)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(n):
        _ = ds[i % len(ds)]
    return {"cpu_ms_per_sample": 1000 * (time.process_time() - cpu0) / n,
            "wall_ms_per_sample": 1000 * (time.perf_counter() - wall0) / n, "samples": n}


def available(name: str) -> str | None:
    """None if the pipeline can run here, else why not."""
    try:
        if name == "ffcv":
            from pipelines.ffcv import import_ffcv

            import_ffcv()  # not a bare `import ffcv`: that would set torch's thread count to 1
        elif name == "dali":
            import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"not installed ({e})"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root (reference and dali read it)")
    p.add_argument("--beton", help="the same images as a .beton (default: written from --data to a temp dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--pipelines", nargs="+", default=list(pipelines.PIPELINES), choices=list(pipelines.PIPELINES))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=4, help="reference: processes; ffcv/dali: threads")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    p.add_argument("--counts", type=int, nargs="+", default=[2, 6])
    p.add_argument("--min-scales", type=float, nargs="+", default=[0.14, 0.05])
    p.add_argument("--max-scales", type=float, nargs="+", default=[1.0, 0.14])
    p.add_argument("--host-cost", type=int, default=64, help="samples for the reference host cost (0: skip "
                   "table 2); the ffcv host cost uses --batches batches")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if args.warmup < 1:
        p.error("--warmup must be >= 1")
    if not (len(args.sizes) == len(args.counts) == len(args.min_scales) == len(args.max_scales)):
        p.error("--sizes, --counts, --min-scales and --max-scales need one value per crop group")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = MultiCropSpec(groups=tuple(CropGroup(*g) for g in zip(args.sizes, args.counts, args.min_scales,
                                                                  args.max_scales, strict=True)))
    base = Config(data_path=args.data, batch_size=args.batch_size, workers=args.workers, nmb_crops=args.counts,
                  size_crops=args.sizes, min_scale_crops=args.min_scales, max_scale_crops=args.max_scales)
    tmp = tempfile.TemporaryDirectory(prefix="profile_pipeline_")
    beton = args.beton
    if "ffcv" in args.pipelines and available("ffcv") is None and beton is None:
        from tools.write_ffcv import write_beton

        beton = str(Path(tmp.name) / "data.beton")
        print(f"writing {beton} from {args.data} ...", file=sys.stderr)
        write_beton(args.data, beton, progress=False)

    rows, notes, host, failed = [], [], {}, []
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    cpu_name = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_name}"

    def save(partial: bool = True) -> None:  # rewritten after every measurement: a time limit keeps what is done
        if args.json:
            args.json.write_text(json.dumps({"date": stamp, "device": where, "args": {k: str(v) for k, v in
                                                                                      vars(args).items()},
                                             "rows": rows, "host_cost": host, "not_run": notes,
                                             **({"partial": True} if partial else {})}, indent=1))

    def measure(what: str, fn):  # one failure is a note, and the other measurements still run
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            print(f"{what} failed: {type(e).__name__}: {e}", file=sys.stderr)
            notes.append(f"{what}: failed ({type(e).__name__}: {str(e)[:300]})")
            failed.append(what)
            return None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print("profiling the device side alone (decode + augment) ...", file=sys.stderr)
    row = measure("decode+augment", lambda: time_device_side(args.data, spec, device, args.batch_size,
                                                             args.batches, args.warmup, base.gpu_resample))
    if row:
        rows.append(row)
    save()
    for name in args.pipelines:
        why = available(name)
        if why:
            notes.append(f"{name}: {why}")
            continue
        cfg = Config(**{**vars(base), "pipeline": name, "data_path": beton if name == "ffcv" else args.data})
        print(f"profiling {name} ...", file=sys.stderr)
        try:
            loader = pipelines.build(spec, cfg, device)
        except (ValueError, ImportError, RuntimeError) as e:
            notes.append(f"{name}: could not be built ({e})")
            continue

        def timed(name=name, loader=loader) -> dict:
            row = {"pipeline": name, **time_loader(loader, device, args.batches, args.warmup)}
            if name == "ffcv":
                row.update(time_ffcv_split(loader, device, args.batches, args.warmup))
            return row

        row = measure(name, timed)
        if row:
            rows.append(row)
        save()

    if args.host_cost:
        print("measuring host cost per sample ...", file=sys.stderr)
        costs = {"reference": lambda: reference_host_cost(base, spec, args.host_cost)}
        if "ffcv" in args.pipelines and available("ffcv") is None:
            cfg = Config(**{**vars(base), "pipeline": "ffcv", "data_path": beton, "workers": 1})
            costs["ffcv"] = lambda cfg=cfg: ffcv_host_cost(pipelines.build(spec, cfg, torch.device("cpu")),
                                                           args.batches, args.warmup)
        if "dali" in args.pipelines and available("dali") is None:
            cfg = Config(**{**vars(base), "pipeline": "dali", "workers": 1})
            costs["dali"] = lambda cfg=cfg: dali_host_cost(pipelines.build(spec, cfg, torch.device("cpu")),
                                                           args.batches, args.warmup)
        for path, fn in costs.items():
            cost = measure(f"host cost of {path}", fn)
            if cost:
                host[path] = cost
            save()

    crops = " + ".join(f"{n}x{s}" for n, s in zip(args.counts, args.sizes, strict=True))
    print(f"# {stamp}, {where}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, {crops}; "
          f"{args.batches} batches after {args.warmup} warm-up")
    print(f"{'pipeline':<15}{'samples/s':>11}{'crops/s':>10}{'ms/batch':>10}{'host ms':>9}{'decode ms':>11}"
          f"{'augment ms':>12}")
    for r in rows:
        split = [f"{r[k]:.1f}" if k in r else "-" for k in ("host_ms_per_batch", "decode_ms_per_batch",
                                                             "augment_ms_per_batch")]
        print(f"{r['pipeline']:<15}{r['samples_per_s']:>11.1f}{r['crops_per_s']:>10.0f}{r['ms_per_batch']:>10.1f}"
              f"{split[0]:>9}{split[1]:>11}{split[2]:>12}")
    if host:
        print("\n# host CPU time per sample (process time, all threads), device work excluded")
        print(f"{'path':<11}{'CPU ms/sample':>15}{'wall ms/sample':>16}{'samples':>9}")
        for k, v in host.items():
            print(f"{k:<11}{v['cpu_ms_per_sample']:>15.3f}{v['wall_ms_per_sample']:>16.3f}{v['samples']:>9}")
        if "ffcv" in host and "reference" in host:
            ratio = host["reference"]["cpu_ms_per_sample"] / host["ffcv"]["cpu_ms_per_sample"]
            verdict = "meets" if host["ffcv"]["cpu_ms_per_sample"] <= 0.1 else "misses"
            print(f"ffcv host path: {ratio:.0f}x less CPU per sample than the reference chain; {verdict} the "
                  "0.1 ms/sample/core target")
    for n in notes:
        print(f"not run: {n}")
    save(partial=False)
    tmp.cleanup()
    return 0 if rows and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
