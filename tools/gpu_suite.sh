#!/usr/bin/env bash
# GPU verification from a fresh checkout on a CUDA machine (no network needed), in stages:
#   bash tools/gpu_suite.sh                  # every stage, then the report
#   bash tools/gpu_suite.sh tests step       # only these stages (then `... report` when all are done)
# Stages: tests (the GPU-only tests), step (tools/profile_step.py on CUDA: official-style, eager, compile, graph),
# pipeline (tools/profile_pipeline.py on CUDA, synthetic JPEGs), smoke (224 training steps in graph mode), modes
# (12 steps each in eager, compile and graph mode, to compare losses), report (tools/gpu_suite_report.py: dated
# rows appended to BENCHMARKS.md, each target checked, and the list of what failed or could not run).
# Environment: PYTHON (default python3; its torch >= 2.11 and triton are used), WHEELS (default ./wheels: where
# missing pure helpers such as pytest and rich are installed from), SUITE_DIR (default gpu_suite_out, git-ignored),
# STAGE_TIMEOUT (seconds per command, default 540), COPY_TO (a directory that the small outputs, not the images
# nor the checkpoints, are copied to at the end; the device tool's $OUT), MODES (the step modes the modes stage
# trains, default "eager compile graph").
#
# With the device tool: a call may run 600 s and a session has 30 min, so run one or two stages per call.
# SUITE_DIR stays on the warm machine between calls (it is git-ignored), so the last call can make the report:
#   COPY_TO=$OUT bash tools/gpu_suite.sh tests        (carry: ["wheels"] on the first call)
#   COPY_TO=$OUT bash tools/gpu_suite.sh step
#   COPY_TO=$OUT bash tools/gpu_suite.sh pipeline smoke
#   MODES="eager graph" COPY_TO=$OUT bash tools/gpu_suite.sh modes
#   MODES=compile COPY_TO=$OUT bash tools/gpu_suite.sh modes      (inductor on ResNet-50 may take minutes)
#   COPY_TO=$OUT bash tools/gpu_suite.sh report
# then copy $OUT's benchmark_rows.md into BENCHMARKS.md here. Preparing the wheels on a machine with network, for
# a GPU machine with Python 3.12 and none (43 MB, within carry's 64 MiB):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform any -d wheels pytest rich pillow numpy matplotlib
# UNVERIFIED: everything this script checks was written without a GPU and has not run on one yet (the CUDA-graph
# step, the fused Sinkhorn on a GPU, nvJPEG decode + gpu_augment on CUDA, every GPU figure). FFCV and DALI are not
# on the GPU machine (no cp312 wheels small enough to carry), so their loaders are profiled only where installed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
DIR=${SUITE_DIR:-gpu_suite_out}
LIMIT=${STAGE_TIMEOUT:-540}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ALL=(tests step pipeline smoke modes report)
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=("${ALL[@]}")
for s in "${stages[@]}"; do
    case " ${ALL[*]} " in
        *" $s "*) ;;
        *) echo "gpu_suite: unknown stage '$s'; the stages are: ${ALL[*]}"; exit 2 ;;
    esac
done
MODE_LIST=${MODES:-eager compile graph}
for m in $MODE_LIST; do
    case $m in
        eager|compile|graph) ;;
        *) echo "gpu_suite: MODES: unknown step mode '$m' (eager, compile, graph)"; exit 2 ;;
    esac
done
mkdir -p "$DIR/status"

# run_stage NAME LOG COMMAND...: run with a time limit, keep stdout+stderr in $DIR/LOG, record the outcome
run_stage() {
    local name=$1 log=$2 start rc status
    shift 2
    start=$(date +%s)
    timeout -k 10 "$LIMIT" "$@" > "$DIR/$log" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status="timed out after $LIMIT s" ;; *) status="failed (exit $rc)" ;; esac
    printf '{"status": "%s", "seconds": %d, "log": "%s"}\n' "$status" "$(( $(date +%s) - start ))" "$log" \
        > "$DIR/status/$name.json"
    echo "gpu_suite: $name: $status ($(( $(date +%s) - start )) s); last lines of $DIR/$log:"
    tail -n 6 "$DIR/$log" | sed 's/^/    /'
}

# synthetic ImageFolder of 2048 photo-like JPEGs (4 classes, 500x375), made once
synthetic() {
    "$PY" - "$DIR/synthetic" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(sys.argv[1])
rng = np.random.default_rng(0)
for i in range(2048):
    d = root / f"c{i % 4}"
    d.mkdir(parents=True, exist_ok=True)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # drawn for every i, so the set never depends on
    if not (d / f"{i:05d}.jpg").exists():                      # which files an earlier call already wrote
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)
EOF
}

needs_gpu=no
for s in "${stages[@]}"; do [ "$s" != report ] && needs_gpu=yes; done
if [ $needs_gpu = yes ]; then
    if ! "$PY" -c "import torch, triton" 2>/dev/null; then
        echo "gpu_suite: $PY cannot import torch and triton; set PYTHON to the interpreter that has them"
        exit 1
    fi
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_suite: torch sees no CUDA device; only the 'report' stage runs without one"
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
    "$PY" - "$DIR/env.json" <<'EOF'
import json
import sys

import torch
import triton

json.dump({"device": torch.cuda.get_device_name(), "stack": f"torch {torch.__version__}, triton "
           f"{triton.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}"}, open(sys.argv[1], "w"))
EOF
    echo "gpu_suite: $(cat "$DIR/env.json")"
fi

# the bs256 recipe's values on one GPU (64 images, 2x224 + 6x96), reference pipeline on the synthetic JPEGs
TRAIN=(train.py --preset bs256_200ep --pipeline reference --data_path "$DIR/synthetic" --workers 12 --queue_length 384)

for s in "${stages[@]}"; do
    case $s in
    tests)
        run_stage tests tests.txt "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_sinkhorn_triton.py \
            tests/test_gpu_augment.py tests/test_step_graph.py tests/test_long_runs.py tests/test_syncbn.py \
            -k "cuda or gpu or GPU" ;;
    step)
        run_stage step profile_step.txt "$PY" tools/profile_step.py --device cuda --json "$DIR/profile_step.json" ;;
    pipeline)
        synthetic
        run_stage pipeline profile_pipeline.txt "$PY" tools/profile_pipeline.py --device cuda --data "$DIR/synthetic" \
            --batch-size 64 --batches 20 --warmup 3 --workers 12 --json "$DIR/profile_pipeline.json" ;;
    smoke)  # 7 epochs x 32 steps, the whole step one CUDA graph; freeze window ends at step 50, queue from epoch 1
        synthetic
        rm -rf "$DIR/smoke_run"
        run_stage smoke smoke_run.txt "$PY" "${TRAIN[@]}" --run_dir "$DIR/smoke_run" --epochs 7 \
            --epoch_queue_starts 1 --freeze_prototypes_niters 50 --log_every 8 --step_mode graph ;;
    modes)  # the same 12 steps in each mode: the freeze window ends at step 4, the queue (384 rows) is in use from 6
        synthetic
        for mode in $MODE_LIST; do
            rm -rf "$DIR/modes_$mode"
            run_stage "modes_$mode" "modes_$mode.txt" "$PY" "${TRAIN[@]}" --run_dir "$DIR/modes_$mode" --epochs 1 \
                --max_steps_per_epoch 12 --epoch_queue_starts 0 --freeze_prototypes_niters 4 --log_every 1 \
                --step_mode "$mode"
        done ;;
    report)
        "$PY" tools/gpu_suite_report.py "$DIR" --append BENCHMARKS.md ;;
    esac
done

if [ -n "${COPY_TO:-}" ]; then
    mkdir -p "$COPY_TO"
    (cd "$DIR" && find . -path ./synthetic -prune -o -type f \( -name '*.txt' -o -name '*.json' -o -name '*.jsonl' \
        -o -name '*.md' \) -print | while read -r f; do
            mkdir -p "$COPY_TO/$(dirname "$f")" && cp "$f" "$COPY_TO/$f"
        done)
    echo "gpu_suite: outputs copied to $COPY_TO"
fi
