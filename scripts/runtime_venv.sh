#!/usr/bin/env bash
# The runtime-only install, as a deployment machine gets it: a second venv (.venv-runtime) with
# `pip install '.[cpu]'` from this repository (not editable: the package as it would ship), no PyTorch.
# scripts/test.sh makes it and points LDSEG_RUNTIME_PYTHON at it for tests/runs/test_without_torch.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${1:-.venv-runtime}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet ".[cpu]"
"$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps .  # this checkout's code, even if reused
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "runtime_venv.sh: torch is importable in $VENV: the runtime-only install is not torch-free" >&2
  exit 1
fi
