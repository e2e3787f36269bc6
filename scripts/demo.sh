#!/usr/bin/env bash
# Set up, then segment a fresh synthetic phantom with the bundled demo model and print its Dice.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ldseg-run --demo -o demo-out --overwrite "$@"
