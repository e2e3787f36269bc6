#!/usr/bin/env bash
# QC report on phantoms, rendered by headless Chromium from disk with no network (issue 20).
# Writes 6 phantoms (two with Gaussian noise added), runs ldseg-run --samples 8 --report --labels
# with the bundled demo model, and screenshots report.html. Needs chromium (apt-get install chromium).
# Usage: bash scripts/qc_report_screenshot.sh OUT_DIR [SCREENSHOT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: qc_report_screenshot.sh OUT_DIR [SCREENSHOT.png]}
SHOT=${2:-$OUT/report-screenshot.png}
BROWSER=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$BROWSER" ] || { echo "no chromium on PATH (apt-get install chromium)" >&2; exit 1; }
mkdir -p "$OUT/images" "$OUT/labels"
.venv/bin/python - "$OUT" <<'PY'
import sys
from pathlib import Path

import numpy as np

from ldseg.data.phantoms import Phantom, make_phantom, write_phantom_nifti

out = Path(sys.argv[1])
for seed, sigma in [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (4, 0.3), (5, 0.5)]:
    p = make_phantom(seed)
    rng = np.random.default_rng(seed)
    noisy = p.image + rng.normal(scale=sigma * float(np.ptp(p.image)), size=p.image.shape)
    image = np.clip(np.round(noisy), -32768, 32767).astype(np.float32)
    write_phantom_nifti(Phantom(image, p.label), out / "images" / f"phantom{seed}.nii.gz",
                        out / "labels" / f"phantom{seed}.nii.gz", overwrite=True)
PY
.venv/bin/ldseg-run "$OUT/images" -o "$OUT/run" --samples 8 --report --labels "$OUT/labels" --overwrite
"$BROWSER" --headless --no-sandbox --disable-gpu --hide-scrollbars --host-resolver-rules="MAP * ~NOTFOUND" \
  --proxy-server=127.0.0.1:9 --window-size=1400,1300 --screenshot="$SHOT" "file://$(realpath "$OUT/run/report.html")" \
  2> "$OUT/chromium.log"  # headless Chromium logs D-Bus noise on machines without a session bus
echo "$SHOT"
