#!/usr/bin/env bash
# Create .venv and install ldseg for the CPU, everything included (the runtime, the export extra, Ray, dev tools): constraints/cpu.txt pins the CPU torch wheel so pip
# never pulls the multi-GB CUDA build; `.[cpu]` brings the CPU onnxruntime. GPU users: pip install -e ".[gpu]"
# (onnxruntime-gpu, never together with `.[cpu]`) without the constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints/cpu.txt -e ".[export,dev,cpu,ray,serve]"
# Type stubs for the TensorRT code paths (mypy). --no-deps: the stubs package requires the real
# tensorrt wheels, whose install downloads from NVIDIA's index. The stubs ship `tensorrt/__init__.pyi`
# only, so `import tensorrt` then yields an empty namespace package: ldseg checks for real TensorRT.
.venv/bin/python -m pip install --quiet --no-deps "tensorrt-stubs==10.13.0.35.1"
