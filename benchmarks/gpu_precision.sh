#!/usr/bin/env bash
# Issue 31's GPU measurement, prepared for the next GPU session (it has not run: no GPU since it was
# written). The knee model (official encoders/decoder + a trained denoiser), 15 DDIM steps, batch 1,
# on CUDA: torch fp32/bf16/fp16 (whole-pipeline graph; each reduced precision held to the accuracy
# gate), then the same with torch.compile, and ONNX Runtime CUDA fp32/fp16 bundles, with Dice on the
# held-out case and agreement with torch FP32 in one ldseg-bench run each.
#   CHECKPOINT=work/knee/knee3d.safetensors bash benchmarks/gpu_precision.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CHECKPOINT=${CHECKPOINT:?the knee3d checkpoint with a trained denoiser}
DATA=${DATA:-../shared/data/knee}
HELDOUT=${HELDOUT:-case4}
MACHINE=$("$PY" -c 'from ldseg.bench.machine import machine_info, machine_slug; print(machine_slug(machine_info()))')
OUT=${OUT:-benchmarks/results/${MACHINE}-$(date -u +%F)/gpu-precision}
BENCH_DATA=$(mktemp -d)
trap 'rm -rf "$BENCH_DATA"' EXIT
mkdir "$BENCH_DATA/images" "$BENCH_DATA/labels"
ln -s "$(realpath "$DATA/images/$HELDOUT.nii.gz")" "$BENCH_DATA/images/"
ln -s "$(realpath "$DATA/labels/$HELDOUT.nii.gz")" "$BENCH_DATA/labels/"
bench() { "$PY" -m ldseg.bench --checkpoint "$CHECKPOINT" --data "$BENCH_DATA" --steps 15 --batch 1 \
    --repeat "${REPEAT:-10}" --warmup 2 --device "${DEVICE:-cuda}" "$@"; }
bench --backends torch,onnxruntime --precisions fp32,bf16,fp16 -o "$OUT/eager-and-graph"
LDSEG_TORCH_COMPILE=1 bench --backends torch --precisions fp32,bf16 -o "$OUT/compiled"
