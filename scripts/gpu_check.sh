#!/usr/bin/env bash
# One GPU verification run of every CUDA/TensorRT path (ldseg/bench/gpu_check/): within --budget-s (default
# 420 s, the whole run), no network, one JSON report rewritten after every check (default
# benchmarks/results/<gpu>-<date>/gpu_check.json; --output DIR writes DIR/gpu_check.json).
#   bash scripts/gpu_check.sh --prepare       on a CPU machine (uses .venv): bundles, phantoms, wheels
#                                             into work/gpu-check, which travels with the working tree
#   bash scripts/gpu_check.sh [--output DIR]  on the GPU machine, with its own Python (PYTHON=..., default
#                                             python3: the one with CUDA PyTorch), never the CPU .venv
# Without a GPU it prints one line and exits 6.
set -euo pipefail
# --output DIR is relative to where the script was called from (it cd's into the repository below).
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --output) args+=("--output" "$(realpath -m -- "$2")"); shift 2 ;;
    --output=*) args+=("--output" "$(realpath -m -- "${1#--output=}")"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- ${args[@]+"${args[@]}"}
cd "$(dirname "$0")/.."
PREPARED=${LDSEG_GPU_CHECK_DIR:-work/gpu-check}
if [ "${1:-}" = "--prepare" ]; then
  PY=${PYTHON:-.venv/bin/python}
  exec "$PY" -m ldseg.bench.gpu_check --prepared "$PREPARED" "$@"
fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/$PREPARED/site${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=$PY bash scripts/gpu_wheels.sh "$PREPARED/wheels" "$PREPARED/site"  # offline: what this Python lacks
exec "$PY" -m ldseg.bench.gpu_check --prepared "$PREPARED" "$@"
