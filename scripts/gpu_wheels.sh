#!/usr/bin/env bash
# Offline, on the GPU machine: install into TARGET the prepared wheels (work/gpu-check/wheels) whose
# module this Python lacks, and only those (the image's own packages stay first for everything else).
# Used by gpu_check.sh and gpu_session.sh.   Usage: gpu_wheels.sh WHEELS_DIR TARGET   (PYTHON=..., default python3)
set -uo pipefail
wheels=${1:?usage: $0 WHEELS_DIR TARGET} target=${2:?usage: $0 WHEELS_DIR TARGET}
PY=${PYTHON:-python3}
missing=$("$PY" - <<'PYEOF'
import importlib.util
wanted = {"nibabel": "nibabel", "platformdirs": "platformdirs", "packaging": "packaging",
          "safetensors": "safetensors", "psutil": "psutil", "typer": "typer", "click": "click",
          "rich": "rich", "shellingham": "shellingham", "markdown_it": "markdown-it-py", "mdurl": "mdurl",
          "pygments": "pygments", "typing_extensions": "typing_extensions",
          "importlib_resources": "importlib_resources"}
print(" ".join(dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None))
PYEOF
)
if [ -n "$missing" ] && [ -d "$wheels" ]; then
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet --no-index --no-deps --find-links "$wheels" --target "$target" $missing ||
    echo "could not install $missing from $wheels (what needs them will say so)" >&2
fi
exit 0
