#!/usr/bin/env bash
# GPU verification from a fresh checkout on a CUDA machine (no network needed), in stages:
#   bash tools/gpu_suite.sh                  # every stage, then the report (on a GPU machine of your own)
#   bash tools/gpu_suite.sh step tests       # only these stages, in this order
# Stages: tests (the GPU-only tests), step (tools/profile_step.py on CUDA: Sinkhorn alone, then official-style,
# eager, graph, compile), pipeline (tools/profile_pipeline.py on CUDA, synthetic JPEGs), smoke (224 training steps
# in graph mode), modes (12 steps each in eager, compile and graph mode, to compare losses), report
# (tools/gpu_suite_report.py: dated rows appended to BENCHMARKS.md, each target checked, and the list of what
# failed or could not run; needs no GPU).
# Environment: PYTHON (default python3; its torch >= 2.11 and triton are used), WHEELS (default ./wheels: where
# missing helpers such as pytest and rich are installed from; the device image has them), SUITE_DIR (default
# gpu_suite_out, git-ignored), STAGE_TIMEOUT (seconds per stage at most, default 540), CALL_SECONDS (default 570:
# the whole command's budget; a stage gets at most what is left of it less 20 s, and one that would get less than
# 30 s is not started but marked so), COPY_TO (a directory that one archive, gpu_suite.tgz, of the small outputs
# is written to after every stage: no images, checkpoints or plots), MODES (the step modes the modes stage
# trains, default "eager compile graph").
#
# With the device tool: a call may run 600 s, a session has 30 min of device time, at most 8 files come back per
# call, and each call usually starts a fresh machine (a warm one is given back 30 s after a call). So every call
# is self-contained and returns one archive; the report is made here, from all the archives together:
#   call 1: COPY_TO=$OUT bash tools/gpu_suite.sh step                            (the issue's targets first)
#   call 2: MODES="eager graph" COPY_TO=$OUT bash tools/gpu_suite.sh tests modes smoke pipeline
#   call 3: MODES=compile COPY_TO=$OUT bash tools/gpu_suite.sh modes   (inductor compiles ResNet-50 twice: the
#           compiled step specialises on the freeze and queue phases, which change together at step 6)
#   after each call, here: mkdir -p gpu_suite_out && tar -xzf <files_at>/gpu_suite.tgz -C gpu_suite_out
#   at the end, here:      bash tools/gpu_suite.sh report     (appends the rows to BENCHMARKS.md)
# A stage that a call had no time left for says so in the report; run it in another call.
# UNVERIFIED: everything this script checks was written without a GPU and has not run on one yet (the CUDA-graph
# step, the fused Sinkhorn on a GPU, nvJPEG decode + gpu_augment on CUDA, every GPU figure). FFCV and DALI are not
# on the GPU machine, so their loaders are profiled only where installed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
DIR=${SUITE_DIR:-gpu_suite_out}
LIMIT=${STAGE_TIMEOUT:-540}
CALL=${CALL_SECONDS:-570}
T0=$(date +%s)
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

# pack: the small outputs as one archive in $COPY_TO (the device tool returns at most 8 files), rewritten after
# every stage so that a call cut short still returns what its finished stages made
pack() {
    [ -n "${COPY_TO:-}" ] || return 0
    mkdir -p "$COPY_TO"
    tar -czf "$COPY_TO/gpu_suite.tgz.part" -C "$DIR" --exclude=./synthetic --exclude='*.pth' --exclude='*.png' \
        --exclude='*.part' . && mv "$COPY_TO/gpu_suite.tgz.part" "$COPY_TO/gpu_suite.tgz"
}

# status NAME TEXT SECONDS LOG: the stage's outcome, with the machine it ran on (calls may land on other machines)
status() {
    printf '{"status": "%s", "seconds": %d, "log": "%s", "env": %s}\n' "$2" "$3" "$4" \
        "$(cat "$DIR/env.json" 2>/dev/null || echo null)" > "$DIR/status/$1.json"
}

# run_stage NAME LOG COMMAND...: run within this call's time left, keep stdout+stderr in $DIR/LOG, record the outcome
run_stage() {
    local name=$1 log=$2 start rc st limit
    shift 2
    start=$(date +%s)
    limit=$(( T0 + CALL - start - 20 ))
    [ "$limit" -gt "$LIMIT" ] && limit=$LIMIT
    if [ "$limit" -lt 30 ]; then
        st="not run: this call had $(( limit + 20 > 0 ? limit + 20 : 0 )) s of its CALL_SECONDS=$CALL left"
        status "$name" "$st" 0 "$log"
        echo "gpu_suite: $name: $st; run it in another call"
        pack
        return
    fi
    timeout -k 10 "$limit" "$@" > "$DIR/$log" 2>&1
    rc=$?
    case $rc in 0) st=ok ;; 124|137) st="timed out after $limit s" ;; *) st="failed (exit $rc)" ;; esac
    status "$name" "$st" "$(( $(date +%s) - start ))" "$log"
    echo "gpu_suite: $name: $st ($(( $(date +%s) - start )) s); last lines of $DIR/$log:"
    tail -n 6 "$DIR/$log" | sed 's/^/    /'
    pack
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
            tests/test_linear_eval.py tests/test_knn_eval.py \
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
    modes)  # the same 12 steps in each mode: the freeze window ends and the queue (384 rows) comes into use at step
            # 6, so both flags change at one replay in graph mode, and the compiled step compiles twice, not three times
        synthetic
        for mode in $MODE_LIST; do
            rm -rf "$DIR/modes_$mode"
            run_stage "modes_$mode" "modes_$mode.txt" "$PY" "${TRAIN[@]}" --run_dir "$DIR/modes_$mode" --epochs 1 \
                --max_steps_per_epoch 12 --epoch_queue_starts 0 --freeze_prototypes_niters 6 --log_every 1 \
                --step_mode "$mode"
        done ;;
    report)
        "$PY" tools/gpu_suite_report.py "$DIR" --append BENCHMARKS.md ;;
    esac
done

pack
[ -n "${COPY_TO:-}" ] && echo "gpu_suite: outputs packed into $COPY_TO/gpu_suite.tgz (unpack into gpu_suite_out here)"
exit 0
