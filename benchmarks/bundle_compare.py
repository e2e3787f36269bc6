"""Two bundles of the same model, graph by graph on ONNX Runtime CPU (or OpenVINO CPU): are the outputs
bit-identical, and what does each take (median of interleaved runs, batch 1, fixed random inputs)? For
an exporter change that must leave the bundles "as good as today". Not a test: it prints what it
measured.

    git archive <old-commit> ldseg/data/demo.bundle | tar -x -C /tmp/old
    python benchmarks/bundle_compare.py /tmp/old/ldseg/data/demo.bundle ldseg/data/demo.bundle --runs 30
    python benchmarks/bundle_compare.py OLD NEW --runtime openvino --runs 4
    python benchmarks/bundle_compare.py OLD NEW --graphs denoise_step decoder_argmax --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

GRAPHS = ("encoder", "denoise_step", "decoder_argmax", "decoder")


Run = Callable[[], list[np.ndarray]]


def _onnxruntime(path: Path, threads: int) -> Run:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    gen = np.random.default_rng(0)
    feeds = {
        i.name: gen.standard_normal([1 if isinstance(d, str) else d for d in i.shape]).astype(np.float32)
        for i in session.get_inputs()
    }
    return lambda: session.run(None, feeds)


def _openvino(path: Path, threads: int) -> Run:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    gen = np.random.default_rng(0)
    feeds = {
        i.get_any_name(): gen.standard_normal(
            [1 if d.is_dynamic else d.get_length() for d in i.get_partial_shape()]
        ).astype(np.float32)
        for i in compiled.inputs
    }
    return lambda: [np.asarray(v) for v in compiled(feeds).values()]


RUNTIMES = {"onnxruntime": _onnxruntime, "openvino": _openvino}


def nodes(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def compare(
    old: Path, new: Path, runs: int, threads: int, runtime: str = "onnxruntime", graphs: tuple[str, ...] = GRAPHS
) -> list[dict[str, object]]:
    rows = []
    for graph in graphs:
        if not (old / f"{graph}.onnx").is_file() or not (new / f"{graph}.onnx").is_file():
            continue
        make = RUNTIMES[runtime]
        sessions = {"old": make(old / f"{graph}.onnx", threads), "new": make(new / f"{graph}.onnx", threads)}
        outputs = {name: run() for name, run in sessions.items()}  # also the warm-up
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(runs):
            for name in ("old", "new") if r % 2 else ("new", "old"):
                start = time.perf_counter()
                sessions[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
        identical = all(np.array_equal(a, b) for a, b in zip(outputs["old"], outputs["new"]))
        rows.append(
            {
                "runtime": runtime,
                "graph": graph,
                "identical_outputs": identical,
                "max_abs_difference": max(
                    float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
                    for a, b in zip(outputs["old"], outputs["new"])
                ),
                "old_nodes": nodes(old / f"{graph}.onnx"),
                "new_nodes": nodes(new / f"{graph}.onnx"),
                "old_ms": round(statistics.median(times["old"]), 2),
                "new_ms": round(statistics.median(times["new"]), 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtime", choices=sorted(RUNTIMES), default="onnxruntime")
    parser.add_argument("--graphs", nargs="+", choices=GRAPHS, default=list(GRAPHS))
    args = parser.parse_args()
    rows = compare(args.old, args.new, args.runs, args.threads, args.runtime, tuple(args.graphs))
    return 0 if rows and all(r["identical_outputs"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
