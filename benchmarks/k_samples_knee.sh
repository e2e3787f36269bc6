#!/usr/bin/env bash
# The commands behind benchmarks/results/<machine>-<date>/k-samples (issue 26): `ldseg-run --samples 8`
# on the knee model on every CPU backend, with /usr/bin/time -v (peak RSS, wall), and K=1 runs of
# this tree and of a reference tree (the code before issue 26) whose labels must be identical.
#   CHECKPOINT=work/knee/knee3d.safetensors IMAGE=../shared/data/knee/images/case4.nii.gz \
#   REFERENCE=/path/to/ldseg-at-43f5f10 bash benchmarks/k_samples_knee.sh
# REFERENCE is a folder holding the old `ldseg` package (e.g. `git archive 43f5f10 ldseg | tar -x -C DIR`);
# without it the K=1 comparison is skipped. LDSEG_CACHE keeps the exported bundle between the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN="$(dirname "$PY")/ldseg-run"
CHECKPOINT=${CHECKPOINT:?the knee3d checkpoint with a trained denoiser}
IMAGE=${IMAGE:?a held-out knee image}
OUT=${OUT:?the results folder}
WORK=${WORK:-$(mktemp -d)}
BACKENDS=${BACKENDS:-openvino onnxruntime torch}
mkdir -p "$OUT"
uptime | tee "$OUT/load-before.txt"
# One warm-up run exports the bundle into LDSEG_CACHE, so no measured run includes the export.
"$RUN" "$IMAGE" -o "$WORK/warmup" --checkpoint "$CHECKPOINT" --backend onnxruntime --steps 1 --overwrite >/dev/null
for backend in $BACKENDS; do
  for k in 8 1; do
    name="$backend-k$k"
    /usr/bin/time -v "$RUN" "$IMAGE" -o "$WORK/$name" --checkpoint "$CHECKPOINT" --backend "$backend" \
      --samples "$k" --seed 0 --overwrite >"$OUT/$name.log" 2>"$OUT/$name.time"
    cp "$WORK/$name/ldseg-run.csv" "$OUT/$name.manifest.csv"
    uptime >>"$OUT/$name.time"
  done
  if [ -n "${REFERENCE:-}" ]; then
    PYTHONPATH="$REFERENCE" "$RUN" "$IMAGE" -o "$WORK/$backend-k1-reference" --checkpoint "$CHECKPOINT" \
      --backend "$backend" --samples 1 --seed 0 --overwrite >"$OUT/$backend-k1-reference.log" 2>&1
    cp "$WORK/$backend-k1-reference/ldseg-run.csv" "$OUT/$backend-k1-reference.manifest.csv"
  fi
done
# shellcheck disable=SC2086  # BACKENDS is a space-separated list, one argument each
"$PY" benchmarks/k_samples_summary.py --work "$WORK" --out "$OUT" --backends $BACKENDS
uptime | tee "$OUT/load-after.txt"
