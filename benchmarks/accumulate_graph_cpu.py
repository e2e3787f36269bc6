"""The accumulate sample graph (ldseg/runtime/sample_graphs.py) on a knee-sized sample (3 classes,
128 x 128 x 256) through ONNX Runtime's CPU provider, two threads: median of 7 warm runs, and its
votes against np.argmax. Compare two trees by running it with PYTHONPATH set to each, from a
directory that is not a checkout (the graph took no class count before the votes were unrolled):

    PYTHONPATH=<tree> python benchmarks/accumulate_graph_cpu.py <label>
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnxruntime as ort

from ldseg.runtime import sample_graphs

CLASSES, GRID = 3, (128, 128, 256)


def main() -> None:
    try:
        model = sample_graphs.accumulate_graph(CLASSES)
    except TypeError:  # before the votes were unrolled: ArgMax, no class count
        model = sample_graphs.accumulate_graph()  # type: ignore[call-arg]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    p = rng.random((CLASSES, *GRID), dtype=np.float32)
    total = rng.random((CLASSES, *GRID), dtype=np.float32)
    times, labels = [], None
    for _ in range(8):
        start = time.perf_counter()
        _, labels = session.run(None, {"total": total, "probabilities": p})
        times.append(time.perf_counter() - start)
    same = bool((labels == p.argmax(axis=0)).all())
    label = sys.argv[1] if len(sys.argv) > 1 else ""
    print(f"{label} accumulate median {1000 * float(np.median(times[1:])):.1f} ms, votes == np.argmax: {same}")


if __name__ == "__main__":
    main()
