"""Issue 30 item 4: which cuDNN algorithm search ONNX Runtime's CUDA provider should use, by
measurement. Each setting runs in fresh processes (the search is per process): the first run of each
graph (cold: the search included) and the median of the warm runs after it, CUDA synchronized by ORT.

    python benchmarks/ort_cudnn_search.py --bundle <knee bundle> --runs 3 -o benchmarks/results/<gpu>/ort-cudnn

Needs a GPU with onnxruntime-gpu; prints one line and exits 6 without one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
from ldseg.runtime.artifacts.bundle import load_bundle
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.backend import make_inputs
bundle = load_bundle(sys.argv[1])
backend = OnnxRuntimeBackend(bundle, "cuda:0", cuda_graph=False)
image = np.random.default_rng(0).random((1, *bundle.config.image_shape), dtype=np.float32)
inputs = make_inputs(bundle.config, image, [0], bundle.steps, bundle.sampler)
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    out = backend.run(inputs)
    times.append({"total_ms": (time.perf_counter() - start) * 1e3, **out.stage_ms})
print(json.dumps({"describe": backend.describe(), "runs": times}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per setting")
    parser.add_argument("--warm", type=int, default=6, help="runs per process (the first is cold)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("no CUDA provider in this onnxruntime: run on a GPU machine with onnxruntime-gpu")
        return 6
    rows = {}
    for setting in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        colds, warms = [], []
        for _ in range(args.runs):
            env = {**os.environ, "LDSEG_ORT_CUDNN_ALGO_SEARCH": setting}
            done = subprocess.run(
                [sys.executable, "-c", CHILD, args.bundle, str(args.warm)], env=env, capture_output=True, text=True
            )
            if done.returncode:
                rows[setting] = {"error": done.stderr.strip().splitlines()[-1:]}
                break
            runs = json.loads(done.stdout.strip().splitlines()[-1])["runs"]
            colds.append(runs[0]["total_ms"])
            warms.append(statistics.median(r["total_ms"] for r in runs[1:]))
        else:
            rows[setting] = {"cold_ms": colds, "warm_median_ms": warms}
        print(setting, json.dumps(rows[setting]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_cudnn_search.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
