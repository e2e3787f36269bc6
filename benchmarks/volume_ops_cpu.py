"""Issue 30, the CPU side: the device-side volume operations (torch ops, ONNX Runtime graphs) run on
the CPU against the scipy reference path, on the shared knee cases: equality and time. Decides
whether a CPU backend should use them (only if faster; the scipy path is the reference).
With --float32, also the float32 graphs that TensorRT's volume engines are built from
(ldseg/runtime/volume_graphs.py FLOAT32), run by ONNX Runtime on the CPU: how far TensorRT's
arithmetic is from scipy's (TensorRT itself may round the blend differently: not measured here).

    python benchmarks/volume_ops_cpu.py --images ../shared/data/knee/images --labels ../shared/data/knee/labels \
        --repeats 5 [--float32] -o benchmarks/results/<machine>/volume-ops-cpu

Probabilities are the case's label on the knee model grid, one-hot, blurred (sigma 1.5) and
normalized: real class boundaries without running the model. Median seconds of --repeats, the three
paths interleaved per repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx

from ldseg.data.phantoms import blurred_probabilities
from ldseg.io.preprocess import image_to_model_grid, labels_to_model_grid, probabilities_to_input_grid
from ldseg.model.config import get_preset
from ldseg.runtime.backends.onnxruntime.volume import OrtVolumeOps
from ldseg.runtime.backends.torch.volume import TorchVolumeOps
from ldseg.runtime.volume_graphs import class_step_graph, to_model_grid_graph
from ldseg.runtime.volume_ops import FLOAT32, axis_feeds


def float32_graphs() -> tuple[Callable, Callable]:
    """(to_model_grid, labels_on_input_grid) through the float32 graphs on ONNX Runtime's CPU."""
    import onnxruntime as ort

    def session(model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    pre, step = session(to_model_grid_graph(FLOAT32)), session(class_step_graph(FLOAT32))
    kinds = {"index_dtype": FLOAT32.index_dtype, "weight_dtype": FLOAT32.weight_dtype}

    def to_model_grid(raw: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
        volume = np.ascontiguousarray(raw, np.float32)
        return pre.run(None, {"volume": volume, **axis_feeds(volume.shape[::-1], grid, **kinds)})[0]

    def labels_back(probs: np.ndarray, shape_nib: tuple[int, ...]) -> np.ndarray:
        target = tuple(shape_nib)[::-1]
        feeds = axis_feeds(probs.shape[1:], target, **kinds)
        best, index = np.full(target, -np.inf, np.float32), np.zeros(target, np.int32)
        for c in range(probs.shape[0]):
            klass = np.array(c, np.int32)
            best, index, labels = step.run(
                None, {"values": probs[c], **feeds, "best": best, "index": index, "klass": klass}
            )
        return labels.transpose(2, 1, 0)

    return to_model_grid, labels_back


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--float32", action="store_true", help="also TensorRT's float32 graphs (on ONNX Runtime)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = get_preset("knee3d")
    paths = {
        "scipy": (lambda a, g: image_to_model_grid(a, g), probabilities_to_input_grid),
        "torch": (TorchVolumeOps("cpu").to_model_grid, TorchVolumeOps("cpu").labels_on_input_grid),
    }
    ort_ops = OrtVolumeOps([("CPUExecutionProvider", {})], "cpu")
    paths["onnxruntime"] = (ort_ops.to_model_grid, ort_ops.labels_on_input_grid)
    if args.float32:
        paths["float32_graphs"] = float32_graphs()
    rows = []
    for image_path in sorted(args.images.glob("*.nii.gz")):
        raw = np.asarray(nib.load(image_path).dataobj)
        label = np.asarray(nib.load(args.labels / image_path.name).dataobj)
        model_labels = labels_to_model_grid(label, cfg.image_size, cfg.num_classes)
        probs = blurred_probabilities(model_labels, cfg.num_classes)
        ref_image = image_to_model_grid(raw, cfg.image_size)
        ref_labels = probabilities_to_input_grid(probs, raw.shape)
        times: dict[str, dict[str, list[float]]] = {k: {"to_model_grid": [], "labels_back": []} for k in paths}
        row: dict[str, object] = {"case": image_path.name, "input": list(raw.shape)}
        for _ in range(args.repeats):
            for name, (pre, post) in paths.items():
                clock = time.perf_counter()
                image = pre(raw, cfg.image_size)
                times[name]["to_model_grid"].append(time.perf_counter() - clock)
                clock = time.perf_counter()
                labels = post(probs, raw.shape)
                times[name]["labels_back"].append(time.perf_counter() - clock)
                row[f"{name}_image_max_abs"] = float(np.abs(image - ref_image).max())
                row[f"{name}_labels_differing"] = int((labels != ref_labels).sum())
        for name, stages in times.items():
            for stage, values in stages.items():
                row[f"{name}_{stage}_s"] = round(statistics.median(values), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"argv": sys.argv[1:], "load_average": os.getloadavg(), "rows": rows}
    (args.out / "volume_ops_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
