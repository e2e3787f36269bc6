#!/usr/bin/env bash
# A lent GPU's device time (about 15 minutes, machine starts included) spent on issues 30 and 31's
# measurements, prepared here so that it is three `run` calls back to back: the device machine stays
# warm about 30 s after a call and keeps /tmp while it does, and what one call carries (the checkout,
# about 14 MiB, plus `carry`) must stay under 64 MiB, so the onnxruntime-gpu parts (40 + 26 MiB) and the
# knee data travel in separate calls.
#
#   bash scripts/gpu_session.sh prepare     here (CPU, .venv): work/gpu-check (gpu_check.sh --prepare) and
#                                           work/gpu-session/{ort-a,ort-b,knee}, the knee recipe's denoiser
#                                           included; ../shared is read, never committed (work/ is git-ignored)
#   1. run carry=[work/gpu-session/ort-a]                       command: bash scripts/gpu_session.sh stash
#   2. run carry=[work/gpu-session/ort-b, work/gpu-check]        command: bash scripts/gpu_session.sh check
#   3. run carry=[work/gpu-session/knee, work/gpu-check/wheels]  command: bash scripts/gpu_session.sh knee
#
# check: installs onnxruntime-gpu from the two parts, then gpu_check (every CUDA path on the demo model
# and phantoms) within what is left of $BUDGET_S (default 270 s). knee: the knee denoiser that prepare
# carried (scripts/knee_recipe.sh trains it here, case4 held out; trained on the GPU with the recipe's
# settings only where prepare could not), then within what is left of $BUDGET_S (default 450 s), in
# this order: one denoiser step's kernels, official and lean (benchmarks/step_kernels.py), issue 30's
# device pipeline on torch (benchmarks/device_pipeline.py), issue 31's precision bench
# (benchmarks/gpu_precision.sh), the device pipeline on ONNX Runtime CUDA, ONNX Runtime's cuDNN search
# (benchmarks/ort_cudnn_search.py), the torch pipeline at bf16, ONNX Runtime CUDA's cold command
# (benchmarks/startup.py), torch.compile's cost per stage and what its cache saves a second process
# (benchmarks/compile_stages.py). A step that would start with under a minute left is skipped and says so.
# Rehearsed on a CPU (every step runs, ~35 min, BUDGET_S=2400):
#   DEVICE=cpu TRAIN_DEVICE=cpu KNEE_STEPS=2 VOLUMES=2 REPEAT=1 PYTHON=.venv/bin/python OUT=/tmp/r \
#   BUDGET_S=2400 bash scripts/gpu_session.sh knee
# Each call leaves one log and one .tgz under $OUT (what the device tool brings back: at most 8
# files), whatever happens; unpack them into benchmarks/results/<gpu>-<date>/ and commit with the GPU
# named.
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=/tmp/ldseg-gpu
SESSION=work/gpu-session
OUT=${OUT:-$SESSION/out}
DATA=${DATA:-../shared/data}
PY=${PYTHON:-python3}

prepare() {
  local py=${PYTHON:-.venv/bin/python}
  PYTHON=$py bash scripts/gpu_check.sh --prepare
  rm -rf "$SESSION" && mkdir -p "$SESSION/ort-a" "$SESSION/ort-b" "$SESSION/knee/images" "$SESSION/knee/labels"
  cp ../shared/gpu/ort-sm90.tar.xz.part-aa "$SESSION/ort-a/"
  cp ../shared/gpu/ort-sm90.tar.xz.part-ab ../shared/gpu/SHA256SUMS ../shared/gpu/install-onnxruntime-gpu.sh "$SESSION/ort-b/"
  cp "$DATA"/knee/images/case*.nii.gz "$SESSION/knee/images/"
  cp "$DATA"/knee/labels/case*.nii.gz "$SESSION/knee/labels/"
  # The knee denoiser that scripts/knee_recipe.sh trains here (7 min on the 2-core Zen 1; run now where
  # work/knee has none) is carried in place of the official weights, so the knee call does not spend
  # 95 s of the GPU's time training it.
  local trained=work/knee/knee3d.safetensors
  trained_enough() {
    [ -f "$trained" ] && "$py" - "$trained" <<'PYEOF'
import sys
from ldseg.model.checkpoint_file import read_metadata
meta = read_metadata(sys.argv[1])
ok = meta.get("trained", {}).get("denoiser") and meta.get("training", {}).get("step", 0) >= 1000
print(f"{sys.argv[1]}: {'trained' if ok else 'not trained by the recipe'} ({meta.get('training')})")
sys.exit(0 if ok else 1)
PYEOF
  }
  trained_enough || bash scripts/knee_recipe.sh || echo "the knee recipe failed: the knee call trains on the GPU"
  if trained_enough >/dev/null; then
    cp "$trained" "$SESSION/knee/trained.safetensors"
  else
    local w=$DATA/official-keras-weights
    "$py" -c 'from ldseg.cli.export import main; main()' import-keras --preset knee3d --label-encoder "$w/labelEncoder3D.hdf5" \
      --label-decoder "$w/labelDecoder3D.hdf5" --image-encoder "$w/imageEncoder3D.hdf5" \
      -o "$SESSION/knee/official.safetensors" --overwrite
  fi
  du -sh "$SESSION"/* work/gpu-check
  # Each call carries the checkout (tracked and untracked, not ignored) plus its carry: at most 64 MiB.
  local checkout carry size
  checkout=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s -- | awk '{s += $1} END {print s}')
  for carry in "$SESSION/ort-a" "$SESSION/ort-b work/gpu-check" "$SESSION/knee work/gpu-check/wheels"; do
    # shellcheck disable=SC2086  # one call's carry: a space-separated list of paths
    size=$(($(du -scb $carry | tail -1 | cut -f1) + checkout))
    echo "a call carrying $carry: $((size / 1048576)) MiB of 64"
    [ "$size" -le $((64 * 1048576)) ] || { echo "over the device tool's 64 MiB: make the checkout or the carry smaller"; exit 1; }
  done
}

# Everything a call leaves goes to $STASH/out/<call> and is packed into $OUT on exit, even after a failure.
start_call() {
  CALL=$1
  mkdir -p "$STASH/out/$CALL" "$OUT"
  LOG=$OUT/$CALL.log
  exec > >(tee -a "$LOG") 2>&1
  trap 'tar czf "$OUT/$CALL.tgz" -C "$STASH/out" "$CALL"; echo "packed $OUT/$CALL.tgz"' EXIT
  DEADLINE=$(($(date +%s) + ${BUDGET_S:-$2}))
  echo "== $CALL $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU')"
}

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME CMD...: run CMD under what is left of the budget (minus 20 s to pack), or skip it.
step() {
  local name=$1 budget
  shift
  budget=$(($(left) - 20))
  if [ "$budget" -lt 60 ]; then
    echo "-- $name: skipped ($(left) s left)"
    return 0
  fi
  echo "-- $name (up to $budget s): $*"
  local t0=$SECONDS rc=0
  timeout --signal=INT --kill-after=10 "$budget" "$@" || rc=$?
  echo "-- $name: exit $rc after $((SECONDS - t0)) s"
}

site_packages() {  # the prepared wheels this Python lacks (nibabel, platformdirs, ...), into /tmp, on the path
  PYTHON=$PY bash scripts/gpu_wheels.sh work/gpu-check/wheels "$STASH/site"
  export PYTHONPATH="$PWD:$STASH/site${PYTHONPATH:+:$PYTHONPATH}"
}

case "${1:-}" in
  prepare) prepare ;;
  stash)
    mkdir -p "$STASH" && cp "$SESSION"/ort-a/* "$STASH/" && ls -la "$STASH"
    ;;
  check)
    start_call check 270  # with a machine start, call 1 and call 3 (450 s): about 15 device-minutes
    cp "$SESSION"/ort-b/* "$STASH/"
    step install-onnxruntime-gpu bash "$STASH/install-onnxruntime-gpu.sh" "$STASH"
    step gpu_check bash scripts/gpu_check.sh --output "$STASH/out/check/gpu-check" --budget-s $(($(left) - 40))
    ;;
  knee)
    start_call knee 450
    site_packages
    export LDSEG_CACHE=$STASH/cache PYTHONUNBUFFERED=1
    K=$SESSION/knee
    mkdir -p "$STASH/train/images" "$STASH/train/labels"
    for c in case1 case2 case3; do
      cp "$K/images/$c.nii.gz" "$STASH/train/images/"
      cp "$K/labels/$c.nii.gz" "$STASH/train/labels/"
    done
    if [ -f "$K/trained.safetensors" ]; then  # trained by the knee recipe before the call (prepare)
      CKPT=$K/trained.safetensors
      echo "-- train: skipped, $CKPT carried"
    else
      CKPT=$STASH/knee3d.safetensors
      step train "$PY" -c 'from ldseg.cli.train import main; main()' --preset knee3d --data "$STASH/train" \
        --init "$K/official.safetensors" --freeze encoders --steps "${KNEE_STEPS:-1000}" --batch-size 3 \
        --noise-draws 16 --val 0 --lr 1e-3 --lr-schedule cosine --device "${TRAIN_DEVICE:-cuda}" -o "$CKPT" --overwrite
    fi
    [ -f "$CKPT" ] || { echo "no trained checkpoint: the knee steps need it"; exit 1; }
    pipeline() {  # NAME BACKEND [ARGS...]: benchmarks/device_pipeline.py on the knee images
      local name=$1 backend=$2
      shift 2
      step "$name" "$PY" benchmarks/device_pipeline.py --checkpoint "$CKPT" --backend "$backend" \
        --device "${DEVICE:-cuda}" --images "$K/images" --volumes "${VOLUMES:-16}" "$@" -o "$STASH/out/knee/$name"
    }
    # issue 31's launch count first (seconds): the kernels and time of one denoiser step, official and lean
    step step-kernels "$PY" benchmarks/step_kernels.py --preset knee3d --device "${DEVICE:-cuda}" \
      -o "$STASH/out/knee/step-kernels"
    # issue 30 (its numbers must not wait on the precision bench, which exports and compiles), then 31;
    # --samples 1 8: issue 30's K=8 <= 2x K=1 (both backends keep the K samples on the device)
    pipeline device-pipeline-torch torch --samples 1 8
    step precision env CHECKPOINT="$CKPT" DEVICE="${DEVICE:-cuda}" DATA="$K" OUT="$STASH/out/knee/gpu-precision" PYTHON="$PY" \
      bash benchmarks/gpu_precision.sh
    pipeline device-pipeline-onnxruntime onnxruntime --samples 1 8
    bundle=$("$PY" - "$LDSEG_CACHE" <<'PYEOF'
import json, sys
from pathlib import Path
for manifest in sorted(Path(sys.argv[1]).glob("bundles/*/manifest.json")):
    m = json.loads(manifest.read_text())
    if m.get("config", {}).get("preset") == "knee3d" and m.get("precision") == "fp32":
        print(manifest.parent)
        break
PYEOF
)
    if [ -n "$bundle" ]; then
      step ort-cudnn "$PY" benchmarks/ort_cudnn_search.py --bundle "$bundle" --runs 2 \
        -o "$STASH/out/knee/ort-cudnn"
    else
      echo "-- ort-cudnn: skipped (no cached knee3d fp32 bundle)"
    fi
    # the folder rate with issue 31's bf16 model (FP32's model alone is ~124 ms: under 10 volumes/s)
    pipeline device-pipeline-torch-bf16 torch --precision bf16 --device-ops on --samples 1
    # issue 30's cold command (<= 3 s): one-volume ldseg-run processes on the cached knee bundle, ONNX
    # Runtime CUDA (the first, unmeasured, fills the graph cache as a user's first run would)
    if [ -n "$bundle" ]; then
      step cold-ort "$PY" benchmarks/startup.py --bundle "$bundle" --images "$K/images" --case case4 \
        --backend onnxruntime --precision fp32 --device "${DEVICE:-cuda}" --runs 3 --folder 0 -o "$STASH/out/knee/startup-ort"
    fi
    # issue 31's "compile paid once": two processes on one fresh cache, at the target's bf16
    step compile-stages "$PY" benchmarks/compile_stages.py --checkpoint "$CKPT" --device "${DEVICE:-cuda}" \
      --precision bf16 --repeat "${REPEAT:-10}" -o "$STASH/out/knee/compile-stages"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
    ;;
esac
