"""gpu_check's device_volume_ops rows (issue 30): a backend's pre/post-processing on the GPU
(torch: ldseg/runtime/backends/torch/volume.py; ONNX Runtime CUDA: .../onnxruntime/volume.py) against
the CPU reference path (ldseg.io.preprocess) on phantoms, up- and down-sampled: model-grid images
and float maps within MAP_TOLERANCE, labels identical (ties that float rounding flips are counted
and reported), and the time of each on a knee-sized volume (240x104x160 int16 to 128x128x256 and
back), GPU (synchronized, median of REPEATS after a warm-up) against the CPU path in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ldseg.bench.gpu_check.report import Result

MAP_TOLERANCE = 1e-5
REPEATS = 5
# (phantom shape in model order D, H, W; model grid): off-grid both ways, and the knee's sizes.
CASES = (((20, 36, 40), (32, 64, 64)), ((90, 33, 70), (32, 64, 64)), ((160, 104, 240), (128, 128, 256)))


def _soft(labels: np.ndarray, classes: int) -> np.ndarray:
    from scipy import ndimage

    onehot = [ndimage.gaussian_filter((labels == c).astype(np.float32), 1.5) + 1e-3 for c in range(classes)]
    stacked = np.stack(onehot)
    return (stacked / stacked.sum(axis=0)).astype(np.float32)


def _median_ms(call: Callable[[], object], repeats: int = REPEATS) -> float:
    call()  # warm-up: kernels, pinned pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()  # each op synchronizes its stream before returning the host array
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


def _timings(ops: Any, raw: np.ndarray, grid: tuple[int, ...], probs: np.ndarray) -> dict[str, float]:
    from ldseg.io.preprocess import image_to_model_grid, probabilities_to_input_grid

    return {
        "preprocess_device": _median_ms(lambda: ops.to_model_grid(raw, grid)),
        "preprocess_cpu": _median_ms(lambda: image_to_model_grid(raw, grid), 2),
        "labels_device": _median_ms(lambda: ops.labels_on_input_grid(probs, raw.shape)),
        "labels_cpu": _median_ms(lambda: probabilities_to_input_grid(probs, raw.shape), 2),
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


def device_volume_ops(make: Callable[[], Any]) -> Result:
    from ldseg.data.phantoms import make_phantom
    from ldseg.io.preprocess import image_to_model_grid, probabilities_to_input_grid, zoom_to

    ops = make()
    if ops is None:
        return {"status": "not run: no CUDA provider in this onnxruntime (onnxruntime-gpu)"}
    rows: list[dict[str, Any]] = []
    ok = True
    for seed, (shape, grid) in enumerate(CASES):
        raw = make_phantom(seed, shape).image.transpose(2, 1, 0).astype(np.int16)  # nibabel order, as read
        image_err = float(np.abs(ops.to_model_grid(raw, grid) - image_to_model_grid(raw, grid)).max())
        probs = _soft(make_phantom(seed + 10, grid).label, 3)
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
