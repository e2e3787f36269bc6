#!/usr/bin/env bash
# Set up, then lint and format-check (ruff), type-check (mypy) and run the whole test suite
# (CPU; GPU/TensorRT tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
# UTF-8 for the CLI tests' subprocesses and their decoding, whatever the machine's locale
# (outputs say mm³, and ITK sets the C locale inside the test process).
export PYTHONUTF8=1
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy ldseg
.venv/bin/pytest -q "$@"
