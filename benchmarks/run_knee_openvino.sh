#!/usr/bin/env bash
# The exact commands behind benchmarks/results/<machine>-<date>/knee3d-openvino: the CPU backends at
# every precision on the real knee model (official knee3d weights + the denoiser of
# scripts/knee_recipe.sh), 15 DDIM steps, batch 1, and each precision's Dice on a held-out case.
#   CHECKPOINT=work/knee/knee3d.safetensors INT8=work/knee/knee3d-int8 bash benchmarks/run_knee_openvino.sh
# The FP32 bundle is exported once (without the ONNX Runtime validation, which takes minutes here);
# INT8 is the calibrated bundle of that FP32 bundle (`ldseg-export calibrate`), skipped when not given.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CHECKPOINT=${CHECKPOINT:?the knee3d checkpoint with a trained denoiser}
BUNDLE=${BUNDLE:-work/knee/knee3d-fp32}
DATA=${DATA:-../shared/data/knee}
HELDOUT=${HELDOUT:-case4}  # never seen by the recipe's training nor by calibration
MACHINE=$("$PY" -c 'from ldseg.bench.machine import machine_info, machine_slug; print(machine_slug(machine_info()))')
OUT=${OUT:-benchmarks/results/${MACHINE}-$(date -u +%F)/knee3d-openvino}

[ -d "$BUNDLE" ] || "$(dirname "$PY")/ldseg-export" onnx "$CHECKPOINT" -o "$BUNDLE" --no-validate
INT8_ARGS=()
[ -n "${INT8:-}" ] && INT8_ARGS=(--int8-bundle "$INT8")

"$PY" benchmarks/precision_accuracy.py --checkpoint "$CHECKPOINT" --bundle "$BUNDLE" "${INT8_ARGS[@]}" \
    --data "$DATA" --cases "$HELDOUT" -o "$OUT"
# The bench's input: the held-out case and its label (links, nothing copied): Dice vs truth per row.
BENCH_DATA=$(mktemp -d)
trap 'rm -rf "$BENCH_DATA"' EXIT
mkdir "$BENCH_DATA/images" "$BENCH_DATA/labels"
ln -s "$(realpath "$DATA/images/$HELDOUT.nii.gz")" "$BENCH_DATA/images/"
ln -s "$(realpath "$DATA/labels/$HELDOUT.nii.gz")" "$BENCH_DATA/labels/"
"$PY" -m ldseg.bench --checkpoint "$CHECKPOINT" --bundle "$BUNDLE" "${INT8_ARGS[@]}" \
    --backends openvino,onnxruntime,torch --precisions fp32,bf16,int8 --data "$BENCH_DATA" \
    --steps 15 --batch 1 --repeat "${REPEAT:-2}" --warmup 1 --device cpu -o "$OUT" "$@"
