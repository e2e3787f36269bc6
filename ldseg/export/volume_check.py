"""The check `build-engine` runs on the volume engines it just built, before the set is renamed into
place: each operation on two off-grid phantoms (one smaller and one larger than the model grid, int16
as scans are read) against the CPU reference path (ldseg.io.preprocess, scipy in float64).

The engines compute in float32 (TensorRT has no float64), so the bar is a bound, not equality:
model-grid images within IMAGE_TOLERANCE, float maps within MAP_TOLERANCE, labels that differ on at
most MAX_LABELS_DIFFERING of the voxels (an exact tie that float rounding flips; 0 on the knee cases
with the same graphs on ONNX Runtime, benchmarks/volume_ops_cpu.py --float32). A wrong resampling
rule misses these by orders of magnitude (half-pixel coordinates: > 1e-3 on the images). The
numbers go into engines.json (builder.volume_check); a failure is an ArtifactError and no set is
written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ldseg.data.phantoms import blurred_probabilities, make_phantom
from ldseg.errors import ArtifactError
from ldseg.io.preprocess import image_to_model_grid, probabilities_to_input_grid, zoom_to
from ldseg.runtime.volume_ops import VolumeOps

IMAGE_TOLERANCE = 1e-6
MAP_TOLERANCE = 1e-5
MAX_LABELS_DIFFERING = 1e-4  # fraction of the input grid's voxels


def phantom_shapes(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Two input grids (model order D, H, W) off the model grid's ratios: about 0.7x and 1.3x."""
    return [tuple(max(2, int(n * f) + k) for k, n in enumerate(grid)) for f in (0.7, 1.3)]


def check_volume_ops(ops: VolumeOps, grid: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """{"passed", "cases": [...]} for `ops` against the CPU path; ArtifactError when it fails."""
    cases: list[dict[str, Any]] = []
    for seed, shape in enumerate(phantom_shapes(grid)):
        raw = make_phantom(seed, shape).image.transpose(2, 1, 0).astype(np.int16)  # nibabel order, as read
        image_err = float(np.abs(ops.to_model_grid(raw, grid) - image_to_model_grid(raw, grid)).max())
        probs = blurred_probabilities(make_phantom(seed + 10, grid).label, max(2, num_classes))
        labels = ops.labels_on_input_grid(probs, raw.shape)
        differing = int((labels != probabilities_to_input_grid(probs, raw.shape)).sum())
        map_ref = zoom_to(probs[1], raw.shape[::-1]).transpose(2, 1, 0)
        map_err = float(np.abs(ops.map_on_input_grid(probs[1], raw.shape) - map_ref).max())
        cases.append(
            {
                "input_nib": list(raw.shape),
                "image_max_abs": image_err,
                "labels_differing": differing,
                "map_max_abs": map_err,
                "voxels": int(raw.size),
            }
        )
    passed = all(
        c["image_max_abs"] <= IMAGE_TOLERANCE
        and c["map_max_abs"] <= MAP_TOLERANCE
        and c["labels_differing"] <= MAX_LABELS_DIFFERING * c["voxels"]
        for c in cases
    )
    tolerances = {"image": IMAGE_TOLERANCE, "map": MAP_TOLERANCE, "labels": MAX_LABELS_DIFFERING}
    record = {"passed": passed, "cases": cases, "tolerances": tolerances}
    if not passed:
        raise ArtifactError(
            f"the volume engines disagree with the CPU path ({cases}); build with --no-volume-ops to resample "
            "on the CPU instead"
        )
    return record
