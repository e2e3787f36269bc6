#!/usr/bin/env bash
# Set up, then lint and format-check (ruff), lint the shell scripts (shellcheck: the GPU session's
# scripts run where a typo costs device time), type-check (mypy), check the import layering
# (import-linter) and run the whole test suite
# (CPU; GPU/TensorRT tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
# UTF-8 for the CLI tests' subprocesses and their decoding, whatever the machine's locale
# (outputs say mm³, and ITK sets the C locale inside the test process).
export PYTHONUTF8=1
bash scripts/setup.sh
bash scripts/runtime_venv.sh  # the runtime-only install (no torch), which tests/runs/test_without_torch.py runs
export LDSEG_RUNTIME_PYTHON="$PWD/.venv-runtime/bin/python"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
git ls-files -z -- '*.sh' .ci/run | xargs -0 .venv/bin/shellcheck
.venv/bin/mypy ldseg
.venv/bin/lint-imports  # the layering contracts in pyproject.toml ([tool.importlinter])
.venv/bin/pytest -q "$@"
