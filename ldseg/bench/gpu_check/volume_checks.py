"""gpu_check's device_volume_ops rows (issue 30): a backend's pre/post-processing on the GPU
(torch: ldseg/runtime/backends/torch/volume.py; ONNX Runtime CUDA: .../onnxruntime/volume.py;
TensorRT: .../tensorrt/volume.py, whose engines hold one model grid, so only the cases on that grid) against
the CPU reference path (ldseg.io.preprocess) on phantoms, up- and down-sampled: model-grid images
and float maps within MAP_TOLERANCE, labels identical (ties that float rounding flips are counted
and reported), and the time of each on a knee-sized volume (240x104x160 int16 to 128x128x256 and
back), GPU (synchronized, median of REPEATS after a warm-up) against the CPU path in the same run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ldseg.bench.gpu_check.report import Result

MAP_TOLERANCE = 1e-5
REPEATS = 5
# (phantom shape in model order D, H, W; model grid): off-grid both ways, and the knee's sizes.
CASES = (((20, 36, 40), (32, 64, 64)), ((90, 33, 70), (32, 64, 64)), ((160, 104, 240), (128, 128, 256)))


def _timings(ops: Any, raw: np.ndarray, grid: tuple[int, ...], probs: np.ndarray) -> dict[str, float]:
    """Wall time: each op synchronizes its stream before it returns the host array."""
    from ldseg.bench.timing import WallTimer, median_ms
    from ldseg.io.preprocess import image_to_model_grid, probabilities_to_input_grid

    timer = WallTimer()
    return {
        "preprocess_device": median_ms(lambda: ops.to_model_grid(raw, grid), timer, REPEATS),
        "preprocess_cpu": median_ms(lambda: image_to_model_grid(raw, grid), timer, 2),
        "labels_device": median_ms(lambda: ops.labels_on_input_grid(probs, raw.shape), timer, REPEATS),
        "labels_cpu": median_ms(lambda: probabilities_to_input_grid(probs, raw.shape), timer, 2),
    }


def torch_ops(device: str = "cuda:0") -> Any:
    from ldseg.runtime.backends.torch.volume import TorchVolumeOps

    return TorchVolumeOps(device)


def onnxruntime_ops(device: str = "cuda:0") -> Any:
    import onnxruntime as ort

    from ldseg.runtime.backends.onnxruntime.volume import OrtVolumeOps

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    index = device.partition(":")[2] or "0"
    return OrtVolumeOps([("CUDAExecutionProvider", {"device_id": index}), ("CPUExecutionProvider", {})], device)


def device_volume_ops(
    make: Callable[[], Any], unavailable: str = "no CUDA provider in this onnxruntime (onnxruntime-gpu)"
) -> Result:
    from ldseg.data.phantoms import blurred_probabilities, make_phantom
    from ldseg.io.preprocess import image_to_model_grid, probabilities_to_input_grid, zoom_to

    ops = make()
    if ops is None:
        return {"status": f"not run: {unavailable}"}
    rows: list[dict[str, Any]] = []
    ok = True
    for seed, (shape, grid) in enumerate(CASES):
        if getattr(ops, "grid", grid) != grid:  # TensorRT's engines: their own model grid only
            continue
        raw = make_phantom(seed, shape).image.transpose(2, 1, 0).astype(np.int16)  # nibabel order, as read
        image_err = float(np.abs(ops.to_model_grid(raw, grid) - image_to_model_grid(raw, grid)).max())
        probs = blurred_probabilities(make_phantom(seed + 10, grid).label, 3)
        labels = ops.labels_on_input_grid(probs, raw.shape)
        flipped = int((labels != probabilities_to_input_grid(probs, raw.shape)).sum())
        map_ref = zoom_to(probs[1], raw.shape[::-1]).transpose(2, 1, 0)
        map_err = float(np.abs(ops.map_on_input_grid(probs[1], raw.shape) - map_ref).max())
        row: dict[str, Any] = {
            "input_nib": list(raw.shape),
            "grid": list(grid),
            "image_max_abs": image_err,
            "labels_differing": flipped,
            "map_max_abs": map_err,
        }
        if grid == CASES[-1][1]:
            row["ms"] = _timings(ops, raw, grid, probs)
        ok = ok and image_err <= MAP_TOLERANCE and map_err <= MAP_TOLERANCE and flipped == 0
        rows.append(row)
    return {"status": "pass" if ok else "fail", "tolerance": MAP_TOLERANCE, "cases": rows, "device": ops.where}
