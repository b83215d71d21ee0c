#!/usr/bin/env bash
# The GPU check of the speed work, as one prepared script for a lent GPU machine (one `device run` call):
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root
#   DEVICE=cpu SIZE=tiny ZOO_MODELS=din OUT=/tmp/check bash benchmarks/gpu_check.sh   # the plumbing, on CPU
#
# The GPU machine has Python with torch, numpy, pyarrow, scikit-learn, typer, rich and pyyaml but no polars
# and no network: the script installs polars from benchmarks/wheels/ (fetch it here first with
# `pip download polars==<this venv's version> --python-version 3.12 --platform manylinux_2_17_x86_64
# --only-binary=:all: -d benchmarks/wheels`: polars and its polars-runtime wheel, about 55 MB; and name
# benchmarks/wheels in the run's carry list).
#
# Measures, each step under its own time limit so that one failure leaves the others' results:
#   train_speed_<dev>.json          reference QIN (qin.yaml), batch 8192: fast path, per-slot path, no-L2 path,
#                                   FLOPs per sample and MFU against the measured bf16 matmul peak
#   train_speed_<dev>_compile.json  the same with train.compile=true (fast path)
#   train_speed_<dev>_din.json      the organisers' DIN (configs/din.yaml)
#   zoo_speed_<dev>.json            every zoo model at its own config, batch 8192
#   synth_<size>.json, preprocess   `qin synth --size SIZE` and `qin preprocess` wall time
#   epoch_<size>_<dev>.json         one whole epoch of `qin train` (qin.yaml) with its validation
#   predict_<size>_<dev>.json       scoring valid + test
# into $OUT (the device tool's output folder; default benchmarks/results/gpu/). Copy the JSON files into
# benchmarks/results/ and run `python benchmarks/run.py --summary-only` to put them in the README table.
set -uo pipefail

DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-full}
OUT=${OUT:-benchmarks/results/gpu}
WORKDIR=${WORKDIR:-/tmp/qin-gpu-check}
STEP_LIMIT=${STEP_LIMIT:-240}
mkdir -p "$OUT" "$WORKDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
if [ "$DEVICE" = cuda ]; then BATCH=8192; STEPS=20; WARMUP=3; else BATCH=1024; STEPS=1; WARMUP=1; fi

if ! "$PY" -c "import polars" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-index --find-links benchmarks/wheels polars \
        || { echo "gpu_check: polars is missing and benchmarks/wheels/ holds no wheel for it" >&2; exit 2; }
fi
{ date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null; nvidia-smi 2>/dev/null || true; } > "$OUT/machine.txt"

failed=()
step() {  # step NAME COMMAND...: run under the time limit, log to $OUT/NAME.log, remember failures
    local name=$1; shift
    echo "gpu_check: $name" >&2
    if ! timeout "$STEP_LIMIT" "$@" > "$OUT/$name.log" 2>&1; then
        failed+=("$name"); echo "gpu_check: $name FAILED (see $OUT/$name.log)" >&2
    fi
}

step train_speed "$PY" benchmarks/measure.py train_speed --device "$DEVICE" --batch-size $BATCH \
    --steps $STEPS --warmup $WARMUP --paths fast per_slot fast_without_l2 --json "$OUT/train_speed_$DEVICE.json"
step train_speed_din "$PY" benchmarks/measure.py train_speed --device "$DEVICE" --batch-size $BATCH \
    --steps $STEPS --warmup $WARMUP --paths fast --config configs/din.yaml --json "$OUT/train_speed_${DEVICE}_din.json"
if [ "$DEVICE" = cuda ]; then
    step train_speed_compile "$PY" benchmarks/measure.py train_speed --device cuda --batch-size $BATCH \
        --steps $STEPS --warmup 5 --paths fast --set train.compile=true --json "$OUT/train_speed_cuda_compile.json"
fi
zoo_models=()
[ -n "${ZOO_MODELS:-}" ] && zoo_models=(--models $ZOO_MODELS)  # e.g. ZOO_MODELS="qin din": a subset
step zoo_speed "$PY" benchmarks/measure.py zoo_speed --device "$DEVICE" --batch-size $BATCH --steps $STEPS \
    --warmup $WARMUP "${zoo_models[@]}" --json "$OUT/zoo_speed_$DEVICE.json"

data="$WORKDIR/data-$SIZE"
step synth "$PY" benchmarks/measure.py synth --size "$SIZE" --out "$data" --json "$OUT/synth_$SIZE.json"
max_len=64; [ "$SIZE" = tiny ] && max_len=16
step preprocess "$PY" benchmarks/preprocess.py --data "$data/MicroLens_1M_x1" --name "$SIZE" \
    --max-len $max_len --out "$WORKDIR/features"
[ -f "benchmarks/results/preprocess_$SIZE.json" ] && mv "benchmarks/results/preprocess_$SIZE.json" "$OUT/"
features="$WORKDIR/features/$SIZE-L$max_len"
[ -d "$features" ] || features=$(ls -d "$WORKDIR"/features/*/ 2>/dev/null | head -1)
step epoch "$PY" benchmarks/measure.py fit --device "$DEVICE" --features "$features" \
    --set train.epochs=1 --set "train.device=$DEVICE" --set "data.max_len=$max_len" \
    --run-dir "$WORKDIR/run-epoch" --json "$OUT/epoch_${SIZE}_$DEVICE.json"
step predict "$PY" benchmarks/measure.py predict --device "$DEVICE" --features "$features" \
    --set "data.max_len=$max_len" --repeats 3 --json "$OUT/predict_${SIZE}_$DEVICE.json"

echo "gpu_check: results in $OUT" >&2
if [ ${#failed[@]} -gt 0 ]; then echo "gpu_check: failed steps: ${failed[*]}" >&2; exit 1; fi
