#!/usr/bin/env bash
# GPU verification in one command, from a fresh checkout on a CUDA machine (no network needed):
#   bash tools/gpu_suite.sh            # PYTHON=python3.12 and WHEELS=dir override the defaults
# It uses the machine's torch (>= 2.11) and triton, installs missing pure helpers (pytest, rich) from wheels in
# $WHEELS (default ./wheels) when pip cannot find them, runs the GPU-only tests, the step profiler on CUDA and a
# short training smoke run on synthetic JPEGs, appends dated rows to BENCHMARKS.md and lists what it could not run.
# Preparing the wheels on a machine with network, for a GPU machine with Python 3.12 and none (wheels/ is
# git-ignored, so pass it to the device tool's `carry`):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform any -d wheels pytest rich pillow numpy matplotlib
# UNVERIFIED: the CUDA-graph parts (tests/test_step_graph.py's CUDA tests, the graph row of the profiler, the
# --step_mode graph runs below) were written without a GPU and have not run on one yet; this script is their check.
# UNVERIFIED as well: the CUDA side of the pipelines (nvJPEG batched decode + gpu_augment on CUDA, the
# decode+augment row of tools/profile_pipeline.py). FFCV and DALI are not on the GPU machine (no cp312 wheels small
# enough to carry), so their loaders are profiled only where they are installed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
OUT=${SUITE_OUT:-gpu_suite_out}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
not_run=()

if ! "$PY" -c "import torch, triton" 2>/dev/null; then
    echo "gpu_suite: $PY cannot import torch and triton; set PYTHON to the interpreter that has them"
    exit 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: torch sees no CUDA device; nothing here can run without one"
    exit 1
fi
for mod in pytest rich numpy PIL; do
    if ! "$PY" -c "import $mod" 2>/dev/null; then
        pkg=$mod; [ "$mod" = PIL ] && pkg=pillow
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$pkg" 2>/dev/null \
            || "$PY" -m pip install -q "$pkg" 2>/dev/null \
            || { echo "gpu_suite: cannot import or install $pkg (put its wheel in $WHEELS)"; exit 1; }
    fi
done
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
stack=$("$PY" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')")
echo "gpu_suite: $device, $stack"

# ---- 1. GPU-only tests (everything else is covered by make test on CPU)
if "$PY" -m pytest -q -rs tests/test_sinkhorn_triton.py tests/test_gpu_augment.py tests/test_step_graph.py \
        -k "cuda or gpu or GPU" \
        -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1; then tests_ok=yes; else tests_ok=no; fi
tail -3 "$OUT/gpu_tests.txt"

# ---- 2. step profiler: official-style, eager, compiled and CUDA-graph step at the real shapes (64 images, 2x224 + 6x96)
if ! "$PY" tools/profile_step.py --device cuda --json "$OUT/profile_step.json" > "$OUT/profile_step.txt" 2>&1; then
    not_run+=("profile_step (see $OUT/profile_step.txt)")
fi
cat "$OUT/profile_step.txt" | tail -6

# ---- 2b. pipeline profiler: the device side of the ffcv path (batched nvJPEG decode + gpu_augment, 2x224 + 6x96,
#          64 images) beside the reference pipeline, and the host cost per sample, on synthetic JPEGs (also used
#          by the training runs of step 3)
"$PY" - "$OUT/synthetic" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(sys.argv[1])
rng = np.random.default_rng(0)
for i in range(2048):
    d = root / f"c{i % 4}"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / f"{i:05d}.jpg").exists():
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # smooth, photo-like after upscaling
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)
EOF
if ! "$PY" tools/profile_pipeline.py --device cuda --data "$OUT/synthetic" --batch-size 64 --batches 20 \
        --warmup 3 --workers 12 --json "$OUT/profile_pipeline.json" > "$OUT/profile_pipeline.txt" 2>&1; then
    not_run+=("profile_pipeline (see $OUT/profile_pipeline.txt)")
fi
tail -12 "$OUT/profile_pipeline.txt"

# ---- 3. training smoke run: 224 steps on synthetic JPEGs, reference pipeline, bs256 recipe values on one GPU,
#         the whole step as one CUDA graph; then 12 steps each in eager, compile and graph mode, same config, so
#         that the three modes' losses can be compared step by step (freeze window ends at 4, queue in use at 6)
rm -rf "$OUT/smoke_run"
if "$PY" train.py --preset bs256_200ep --data_path "$OUT/synthetic" --run_dir "$OUT/smoke_run" --epochs 7 \
        --queue_length 384 --epoch_queue_starts 1 --freeze_prototypes_niters 50 --workers 12 --log_every 8 \
        --step_mode graph > "$OUT/smoke_run.txt" 2>&1; then smoke_ok=yes; else smoke_ok=no; fi
tail -4 "$OUT/smoke_run.txt"
modes_ok=yes
for mode in eager compile graph; do
    rm -rf "$OUT/modes_$mode"
    "$PY" train.py --preset bs256_200ep --data_path "$OUT/synthetic" --run_dir "$OUT/modes_$mode" --epochs 1 \
        --max_steps_per_epoch 12 --queue_length 384 --epoch_queue_starts 0 --freeze_prototypes_niters 4 \
        --workers 12 --log_every 1 --step_mode "$mode" > "$OUT/modes_$mode.txt" 2>&1 || modes_ok=no
done

# ---- 4. dated rows in BENCHMARKS.md
"$PY" - "$OUT" "$device" "$stack" "$tests_ok" "$smoke_ok" "$modes_ok" <<'EOF'
import datetime
import json
import sys
from pathlib import Path

out, device, stack, tests_ok, smoke_ok, modes_ok = sys.argv[1:]
today = datetime.date.today().isoformat()
rows = [f"\n## GPU suite, {today}, {device}, {stack}\n", "`bash tools/gpu_suite.sh`\n\n"]
rows.append(f"- GPU-only tests: {'passed' if tests_ok == 'yes' else 'FAILED'} "
            f"({Path(out, 'gpu_tests.txt').read_text().strip().splitlines()[-1]})\n")
prof = Path(out, "profile_step.json")
if prof.is_file():
    rows.append("\n| mode | ms/step | samples/s | host syncs | ATen ops | peak GiB |\n|---|---|---|---|---|---|\n")
    for r in json.loads(prof.read_text())["rows"]:
        syncs, ops = ("-" if r[k] is None else r[k] for k in ("host_syncs_per_step", "aten_ops_per_step"))
        rows.append(f"| {r['mode']} | {r['ms_per_step']:.2f} | {r['samples_per_s']:.0f} | {syncs} | {ops} "
                    f"| {r['peak_mem_gib']:.2f} |\n")
pipe = Path(out, "profile_pipeline.json")
if pipe.is_file():
    rep = json.loads(pipe.read_text())
    rows.append("\n| pipeline (64 images, 2x224 + 6x96) | samples/s | ms/batch | decode ms | augment ms |\n"
                "|---|---|---|---|---|\n")
    for r in rep["rows"]:
        dec, aug = (f"{r[k]:.1f}" if k in r else "-" for k in ("decode_ms_per_batch", "augment_ms_per_batch"))
        rows.append(f"| {r['pipeline']} | {r['samples_per_s']:.0f} | {r['ms_per_batch']:.1f} | {dec} | {aug} |\n")
    for k, v in rep.get("host_cost", {}).items():
        rows.append(f"- host CPU time per sample, {k}: {v['cpu_ms_per_sample']:.3f} ms\n")
    for n in rep.get("not_run", []):
        rows.append(f"- pipeline not run: {n}\n")
metrics = Path(out, "smoke_run", "metrics.jsonl")
if metrics.is_file():
    epochs = [json.loads(x) for x in metrics.read_text().splitlines() if '"event": "epoch"' in x]
    if epochs:
        rows.append(f"\n- training smoke run (reference pipeline, graph mode, 64 images/step): "
                    f"{'finished' if smoke_ok == 'yes' else 'FAILED'}, epoch losses "
                    + ", ".join("%.3f" % e["loss"] for e in epochs) + "\n")
losses = {}
for mode in ("eager", "compile", "graph"):
    m = Path(out, f"modes_{mode}", "metrics.jsonl")
    if m.is_file():
        losses[mode] = [json.loads(x)["loss"] for x in m.read_text().splitlines() if '"event"' not in x]
if "eager" in losses:
    for mode in ("compile", "graph"):
        if mode in losses and len(losses[mode]) == len(losses["eager"]):
            diff = max(abs(a - b) for a, b in zip(losses[mode], losses["eager"]))
            rows.append(f"- {mode} vs eager, {len(losses[mode])} steps of one config (bf16): largest loss "
                        f"difference {diff:.2e} (eager losses " + ", ".join("%.4f" % v for v in losses["eager"])
                        + ")\n")
        else:
            rows.append(f"- {mode} vs eager: FAILED (see {out}/modes_{mode}.txt)\n")
with open("BENCHMARKS.md", "a") as f:
    f.writelines(rows)
print("".join(rows))
EOF

[ "$tests_ok" = yes ] || not_run+=("some GPU tests failed: $OUT/gpu_tests.txt")
[ "$smoke_ok" = yes ] || not_run+=("training smoke run failed: $OUT/smoke_run.txt")
[ "$modes_ok" = yes ] || not_run+=("a step-mode comparison run failed: $OUT/modes_*.txt")
not_run+=("multi-GPU: 2-rank NCCL capture test and torchrun with --step_mode compile/graph need 2 GPUs")
"$PY" -c "import ffcv" 2>/dev/null || not_run+=("ffcv pipeline and its tests: ffcv is not installed here")
"$PY" -c "import nvidia.dali" 2>/dev/null || not_run+=("dali pipeline on the GPU: DALI is not installed here")
echo "gpu_suite: not run or failed:"
printf '  - %s\n' "${not_run[@]}"
