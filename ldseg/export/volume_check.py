"""The checks `build-engine` runs on the volume engines it just built, before the set is renamed into
place: each operation on two off-grid phantoms (one smaller and one larger than the model grid, int16
as scans are read) against the CPU reference path (ldseg.io.preprocess, scipy in float64).

The engines compute in float32 (TensorRT has no float64), so the bar is a bound, not equality:
model-grid images within IMAGE_TOLERANCE, float maps within MAP_TOLERANCE, labels that differ on at
most MAX_LABELS_DIFFERING of the voxels (an exact tie that float rounding flips; 0 on the knee cases
with the same graphs on ONNX Runtime, benchmarks/volume_ops_cpu.py --float32). A wrong resampling
rule misses these by orders of magnitude (half-pixel coordinates: > 1e-3 on the images). The
numbers go into engines.json (builder.volume_check); a failure is an ArtifactError and no set is
written. Likewise the sample engines (K samples kept on the GPU) against the host's K-sample
arithmetic (builder.sample_check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ldseg.data.phantoms import blurred_probabilities, make_phantom
from ldseg.errors import ArtifactError
from ldseg.io.preprocess import image_to_model_grid, probabilities_to_input_grid, zoom_to
from ldseg.runtime.samples import HostSamples, SampleResult, host
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


# The sample engines against HostSamples (ldseg/runtime/samples.py): the same float32 sums, so the bar
# is tight; the entropy's division is in float32 (an ulp or two).
SAMPLE_TOLERANCE = 1e-6


def check_sample_engines(
    keep: Callable[[np.ndarray], SampleResult], grid: tuple[int, ...], num_classes: int, samples: int
) -> dict[str, Any]:
    """{"passed", ...} for `keep` (K probability volumes (K, C, *grid) -> the kept SampleResult) against
    the host path on phantom probabilities; ArtifactError when it fails."""
    classes = num_classes  # the engines are built for it (the phantoms' labels beyond it are dropped)
    probabilities = np.stack(
        [blurred_probabilities(make_phantom(20 + k, grid).label, classes) for k in range(samples)]
    ).astype(np.float32)
    reference = HostSamples(samples, grid)
    reference.add(0, probabilities.argmax(axis=1).astype(np.uint8), probabilities)
    expected = reference.result({}, samples)
    kept = keep(probabilities)
    record: dict[str, Any] = {
        "samples": samples,
        "mean_max_abs": float(np.abs(host(kept.mean) - host(expected.mean)).max()),
        "votes_differing": int((host(kept.votes) != host(expected.votes)).sum()),
        "confidence_max_abs": float(np.abs(host(kept.confidence()) - host(expected.confidence())).max()),
        "entropy_max_abs": float(np.abs(host(kept.entropy(classes)) - host(expected.entropy(classes))).max()),
        "voxels": int(np.prod(grid)) * samples,
    }
    record["passed"] = (
        max(record[k] for k in ("mean_max_abs", "confidence_max_abs", "entropy_max_abs")) <= SAMPLE_TOLERANCE
        and record["votes_differing"] <= MAX_LABELS_DIFFERING * record["voxels"]
    )
    record["tolerance"] = SAMPLE_TOLERANCE
    if not record["passed"]:
        raise ArtifactError(
            f"the sample engines disagree with the host path ({record}); build with --no-volume-ops to average "
            "K samples and resample on the CPU instead"
        )
    return record
