"""Issue 30, the CPU side: the device-side volume operations (torch ops, ONNX Runtime graphs) run on
the CPU against the scipy reference path, on the shared knee cases: equality and time. Decides
whether a CPU backend should use them (only if faster; the scipy path is the reference).

    python benchmarks/volume_ops_cpu.py --images ../shared/data/knee/images --labels ../shared/data/knee/labels \
        --repeats 5 -o benchmarks/results/<machine>/volume-ops-cpu

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
from pathlib import Path

import nibabel as nib
import numpy as np

from ldseg.data.phantoms import blurred_probabilities
from ldseg.io.preprocess import image_to_model_grid, labels_to_model_grid, probabilities_to_input_grid
from ldseg.model.config import get_preset
from ldseg.runtime.backends.onnxruntime.volume import OrtVolumeOps
from ldseg.runtime.backends.torch.volume import TorchVolumeOps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = get_preset("knee3d")
    paths = {
        "scipy": (lambda a, g: image_to_model_grid(a, g), probabilities_to_input_grid),
        "torch": (TorchVolumeOps("cpu").to_model_grid, TorchVolumeOps("cpu").labels_on_input_grid),
    }
    ort_ops = OrtVolumeOps([("CPUExecutionProvider", {})], "cpu")
    paths["onnxruntime"] = (ort_ops.to_model_grid, ort_ops.labels_on_input_grid)
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
