#!/usr/bin/env bash
# The exact commands behind the committed CPU results: benchmarks/results/<machine>-<date>/{demo,knee3d}.
# Extra arguments go to both runs (e.g. --overwrite). Expect ~10 min for each run on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MACHINE=$("$PY" -c 'from ldseg.bench.machine import machine_info, machine_slug; print(machine_slug(machine_info()))')
OUT=${OUT:-benchmarks/results/${MACHINE}-$(date -u +%F)}

# The trained demo model, the full sweep: steps x batch, torch eager vs onnxruntime, FP32. Trained
# weights, so the agreement column can disagree (a random-weight --preset gives speed only).
"$PY" -m ldseg.bench --checkpoint demo --backends torch,onnxruntime --precisions fp32 \
    --steps 1,5,15,50 --batch 1,2,4,8 --repeat 5 --warmup 1 --device cpu -o "$OUT/demo" "$@"

# knee3d (128x128x256) at its default 15 steps, batch 1: the official weights plus the denoiser of
# scripts/knee_recipe.sh (trained on knee cases 1-3), scored on case4, which training never saw.
# One run takes tens of seconds on 2 cores, so few repeats. Without that checkpoint: the
# random-weight preset, for speed only (its rows say so instead of an agreement).
KNEE=${KNEE_CHECKPOINT:-work/knee/knee3d.safetensors}
if [ -f "$KNEE" ]; then
  HOLDOUT=work/knee/holdout  # images/ + labels/ of case4 only (symlinks; git-ignored)
  mkdir -p "$HOLDOUT/images" "$HOLDOUT/labels"
  for kind in images labels; do
    ln -sf "$(realpath ../shared/data/knee/$kind/case4.nii.gz)" "$HOLDOUT/$kind/case4.nii.gz"
  done
  "$PY" -m ldseg.bench --checkpoint "$KNEE" --data "$HOLDOUT" --backends torch,onnxruntime --precisions fp32,fp16 \
      --steps 15 --batch 1 --repeat 2 --warmup 2 --device cpu -o "$OUT/knee3d" "$@"
else
  "$PY" -m ldseg.bench --preset knee3d --backends torch,onnxruntime --precisions fp32 \
      --steps 15 --batch 1 --repeat 3 --warmup 2 --device cpu -o "$OUT/knee3d" "$@"
fi

# The README "Performance" section from both runs.
"$PY" -m ldseg.bench.report "$OUT/demo" "$OUT/knee3d" > "$OUT/performance.md"
echo "$OUT"
