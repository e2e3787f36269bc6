#!/usr/bin/env bash
# Set up, then type-check and run the whole test suite (CPU; GPU/TensorRT tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mypy ldseg
.venv/bin/pytest -q "$@"
