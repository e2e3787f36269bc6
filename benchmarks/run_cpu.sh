#!/usr/bin/env bash
# The exact commands behind the committed CPU results: benchmarks/results/<machine>-<date>/{demo,knee3d}.
# Extra arguments go to both runs (e.g. --overwrite). Expect ~10 min for each run on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MACHINE=$("$PY" -c 'from ldseg.bench.machine import machine_info, machine_slug; print(machine_slug(machine_info()))')
OUT=${OUT:-benchmarks/results/${MACHINE}-$(date -u +%F)}

# demo preset, the full sweep: steps x batch, torch eager vs onnxruntime, FP32.
"$PY" -m ldseg.bench --preset demo --backends torch,onnxruntime --precisions fp32 \
    --steps 1,5,15,50 --batch 1,2,4,8 --repeat 5 --warmup 1 --device cpu -o "$OUT/demo" "$@"

# knee3d (128x128x256) at its default 15 steps, batch 1: one run takes tens of seconds, so few repeats;
# two warm-ups, as the ONNX Runtime arena still grows during the second run.
"$PY" -m ldseg.bench --preset knee3d --backends torch,onnxruntime --precisions fp32 \
    --steps 15 --batch 1 --repeat 3 --warmup 2 --device cpu -o "$OUT/knee3d" "$@"

# The README "Performance" section from both runs.
"$PY" -m ldseg.bench.report "$OUT/demo" "$OUT/knee3d" > "$OUT/performance.md"
echo "$OUT"
