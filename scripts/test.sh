#!/usr/bin/env bash
# Set up, then lint and format-check (ruff), type-check (mypy) and run the whole test suite
# (CPU; GPU/TensorRT tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy ldseg
.venv/bin/pytest -q "$@"
