"""Peak memory and time of ONNX Runtime's labels-to-input-grid step (ldseg/runtime/backends/
onnxruntime/volume.py) on the CPU provider, for C classes of knee-sized probabilities (128x128x256 ->
240x104x160), in a fresh process per measurement. `--old FILE` loads another version of volume.py
(e.g. `git show cf82b2b:ldseg/runtime/backends/onnxruntime/volume.py > /tmp/old_volume.py`) to compare;
the labels of both are saved under --out and compared at the end. Not a test: it prints what it measured.

    python benchmarks/ort_labels_memory.py --classes 3 8 --old /tmp/old_volume.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def measure(source: str, classes: int, out: Path) -> dict[str, object]:
    if source == "current":
        from ldseg.runtime.backends.onnxruntime import volume as module
    else:
        spec = importlib.util.spec_from_file_location("other_volume", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    ops = module.OrtVolumeOps([("CPUExecutionProvider", {})], "cpu")
    probs = np.random.default_rng(0).random((classes, 128, 128, 256), dtype=np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(2):  # the first run includes the session
        start = time.perf_counter()
        labels = ops.labels_on_input_grid(probs, (240, 104, 160))
        times.append(round(time.perf_counter() - start, 3))
    np.save(out, labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "source": source,
        "classes": classes,
        "seconds": times,
        "peak_rss_mib": round(peak),
        "before_mib": round(before),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--old", help="another volume.py to compare with")
    parser.add_argument("--one", nargs=3, metavar=("SOURCE", "CLASSES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), Path(args.one[2]))))
        return 0
    sources = ["current"] + ([args.old] if args.old else [])
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for classes in args.classes:
            saved = []
            for k, source in enumerate(sources):
                out = Path(tmp) / f"{k}-{classes}.npy"
                subprocess.run([sys.executable, __file__, "--one", source, str(classes), str(out)], check=True)
                saved.append(np.load(out))
            if len(saved) == 2:
                equal = bool(np.array_equal(saved[0], saved[1]))
                same &= equal
                print(json.dumps({"classes": classes, "labels_identical": equal}))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
