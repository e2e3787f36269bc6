"""What the graph cache (ldseg/runtime/artifacts/graph_cache.py) saves a cold process: ONNX Runtime's
volume ops on a knee-sized volume, first use in a fresh process, with the artifact cache empty (the
graphs built: onnx imported, each graph checked) and with it warm (the graphs read as bytes). Not a
test: it prints and writes what it measured.

    python benchmarks/graph_cache_start.py --image ../shared/data/knee/images/case4.nii.gz --runs 7 \
        -o benchmarks/results/<machine>/graph-cache-start

Each run starts two processes, alternately empty and warm, so a busy machine slows both alike. A
process times, after its imports: the first `to_model_grid` (knee volume to 128x128x256) and the first
`labels_on_input_grid` (three classes back to the volume's grid), then both again (sessions made: the
floor). --provider cuda runs them on ONNX Runtime's CUDA provider (a GPU with onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
import nibabel as nib
import numpy as np
from ldseg.runtime.backends.onnxruntime.volume import OrtVolumeOps
image_path, provider = sys.argv[1], sys.argv[2]
providers = [("CPUExecutionProvider", {})]
if provider == "cuda":
    providers.insert(0, ("CUDAExecutionProvider", {"device_id": "0"}))
volume = np.asarray(nib.load(image_path).dataobj) if image_path else (
    np.random.default_rng(0).integers(0, 1000, (240, 104, 160)).astype(np.int16))
probs = np.random.default_rng(1).random((3, 128, 128, 256), dtype=np.float32)
ops = OrtVolumeOps(providers, provider)
times = {}
for when in ("first", "again"):
    start = time.perf_counter()
    ops.to_model_grid(volume, (128, 128, 256))
    middle = time.perf_counter()
    ops.labels_on_input_grid(probs, volume.shape)
    times[when] = {"pre_s": middle - start, "post_s": time.perf_counter() - middle}
print(json.dumps({**times, "onnx_imported": "onnx" in sys.modules}))
"""


def child(cache: Path, image: str, provider: str) -> dict:
    env = {**os.environ, "LDSEG_CACHE": str(cache), "PYTHONPATH": str(HERE), "PYTHONUTF8": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, image, provider], capture_output=True, text=True, env=env, cwd=HERE, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="", help="a knee volume (default: random int16 of the knee's shape)")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    record: dict = {"command": " ".join(sys.argv), "load_before": os.getloadavg()[0], "empty": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        child(warm, args.image, args.provider)  # fills the warm cache
        for i in range(args.runs):
            record["empty"].append(child(Path(tmp) / f"empty{i}", args.image, args.provider))
            record["warm"].append(child(warm, args.image, args.provider))
    record["load_after"] = os.getloadavg()[0]
    lines = [
        f"`{record['command']}` (load {record['load_before']:.2f} before, {record['load_after']:.2f} after)",
        "",
        "| artifact cache | onnx imported | first to_model_grid, s | first labels_on_input_grid, s | "
        "both, first use, s | both again (floor), s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("empty", "warm"):
        runs = record[name]

        def median(when: str, key: str, of: list[dict] = runs) -> float:
            return statistics.median(r[when][key] for r in of)

        first = statistics.median(r["first"]["pre_s"] + r["first"]["post_s"] for r in runs)
        again = statistics.median(r["again"]["pre_s"] + r["again"]["post_s"] for r in runs)
        imported = sorted({str(r["onnx_imported"]) for r in runs})
        lines.append(
            f"| {name} | {'/'.join(imported)} | {median('first', 'pre_s'):.3f} | {median('first', 'post_s'):.3f} | "
            f"{first:.3f} | {again:.3f} |"
        )
    lines.append(f"\nmedians of {args.runs} processes each ({args.provider} provider), empty and warm alternated")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "graph_cache_start.json").write_text(json.dumps(record, indent=2))
    (args.output / "graph_cache_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
