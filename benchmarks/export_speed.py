"""Issue 32's export measurement: `ldseg-export onnx` wall time per phase, nodes per graph and the
validation table, for one or more checkpoints. Not a test: it prints and writes what it measured.

    python benchmarks/export_speed.py demo work/knee/official.safetensors \
        -o benchmarks/results/<machine>/export

Each checkpoint is exported in a fresh process (`ldseg-export onnx`, validation on, as a first use
does); the phases come from the progress lines' timestamps. Run the same script from an older
checkout (PYTHONPATH=that checkout) with another -o to compare exporters in one sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def export_once(checkpoint: str, folder: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONUTF8": "1", "COLUMNS": "200"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "ldseg-export"), "onnx", checkpoint, "-o", str(folder), "--overwrite"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    code = proc.wait()
    wall = time.perf_counter() - start
    phases: list[tuple[str, float]] = []
    for (t0, line), (t1, _) in zip(lines, [*lines[1:], (wall, "")]):
        if line.startswith(("exporting ", "deriving ", "validating ")):
            phases.append((line, round(t1 - t0, 1)))
    manifest = json.loads((folder / "manifest.json").read_text()) if code == 0 else {}
    nodes = {}
    if code == 0:
        import onnx

        nodes = {name: len(onnx.load(str(folder / f"{name}.onnx")).graph.node) for name in manifest["graphs"]}
    return {
        "checkpoint": checkpoint,
        "exit": code,
        "wall_s": round(wall, 1),
        "phases": phases,
        "nodes": nodes,
        "validation": manifest.get("validation", {}).get("checks", []),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "output_tail": [line for _, line in lines[-5:]] if code else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, checkpoint in enumerate(args.checkpoints):
            result = export_once(checkpoint, Path(tmp) / f"b{k}")
            results.append(result)
            print(json.dumps({k: result[k] for k in ("checkpoint", "exit", "wall_s", "nodes", "load_average")}))
    (args.output / "export.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
