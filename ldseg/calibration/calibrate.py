"""`calibrate`: FP32 bundle + volumes -> INT8 Q/DQ bundle + a report of what INT8 costs.

Why ONNX Runtime's quantizer and not NVIDIA ModelOpt: since TensorRT 10.1/11 INT8 is explicit —
Q/DQ nodes in the ONNX graph, built as written by a strongly typed network — and
`onnxruntime.quantization.quantize_static` writes exactly the Q/DQ form TensorRT needs (QDQ format,
S8S8 symmetric, per-channel weights) with MinMax/Entropy/Percentile calibration. onnxruntime is
already a dependency, runs on any CPU (so calibration and the INT8 accuracy check run on the
development machines and in CI, no GPU needed), and ORT CPU executes the Q/DQ graph with INT8
numerics, so the report measures the real quantization error. ModelOpt (`nvidia-modelopt`) would
add a large dependency tree (it pulls torch extensions, CuPy/ONNX-GraphSurgeon and friends), is
not installed, and its `modelopt.onnx.quantization.quantize` gives the same graph form; it remains
the route for FP8 (not offered here).

Steps: load and verify the FP32 bundle (refused if its manifest does not record a passed
validation, unless trusted); split the volumes into calibration and held-out sets; pre-process each
graph (calibration/quantize.py); run the real FP32 pipeline one calibration volume at a time through
each graph's range-tracking copy (calibration/ranges.py: running min/max, memory of one inference
whatever the number of volumes; the histogram methods record the graph inputs instead); quantize
each graph with those ranges; write the INT8 bundle (same manifest, precision "int8", new hashes,
`source_bundle` recorded) in a temp folder; load it with the ordinary bundle loader and run it with
OnnxRuntimeBackend against the FP32 bundle on the held-out volumes; write calibration.json/.md into
it, and the report's verdict into its manifest (ldseg.export.manifest); rename it into place, or,
if the verdict is "failed", remove it unless `keep_failed`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ldseg.runtime.backends.onnxruntime.probe import onnxruntime_needed

with onnxruntime_needed("INT8 calibration"):
    import onnxruntime

from ldseg.calibration.data import CalibrationVolume, Feed, FeedReader, collect, load_volumes, walk
from ldseg.calibration.quantize import (
    METHODS,
    QUANTIZED_OPS,
    PreparedGraph,
    QuantizedGraph,
    finish_graph,
    prepare_graph,
)
from ldseg.calibration.ranges import RangeTracker
from ldseg.calibration.report import CalibrationReport, compare_pipelines, graph_errors
from ldseg.errors import ArtifactError
from ldseg.export.manifest import with_validation, write_manifest
from ldseg.io.atomic import check_folder_target, staged_folder
from ldseg.runtime.artifacts.bundle import MANIFEST, PASSED, Bundle, load_bundle, sha256_file
from ldseg.runtime.artifacts.engines import bundle_hash

Progress = Callable[[str], None]
INT8 = "int8"


def int8_manifest(
    source: Bundle,
    source_manifest: dict[str, Any],
    folder: Path,
    graphs: dict[str, QuantizedGraph],
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """The source manifest with precision int8, each graph's quantization summary, new file
    hashes, and where it came from."""
    manifest = json.loads(json.dumps(source_manifest))  # deep copy
    manifest["precision"] = INT8
    for name, entry in manifest["graphs"].items():
        entry["precision"] = INT8
        q = graphs[name]
        entry["quantization"] = {
            "quantized": q.quantized,
            "kept_compute": len(q.kept_compute),
            "fp32_ops": q.fp32_ops,
            "preprocessed": q.preprocessed,
        }
    manifest["source_bundle"] = {
        "path": str(source.path.absolute()),
        "manifest_sha256": bundle_hash(source.path),
        "precision": source.precision,
    }
    manifest["calibration"] = calibration
    manifest.setdefault("versions", {})["onnxruntime"] = onnxruntime.__version__
    manifest["files"] = {entry["file"]: sha256_file(folder / entry["file"]) for entry in manifest["graphs"].values()}
    return manifest


def calibrate(
    bundle_dir: Path | str,
    data: Path | str,
    out_dir: Path | str,
    *,
    max_volumes: int = 8,
    method: str = "minmax",
    holdout: int = 2,
    overwrite: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    keep_failed: bool = False,
    trust_unvalidated: bool = False,
) -> CalibrationReport:
    """Quantize an FP32 bundle to INT8 (Q/DQ), calibrated on `data` ("phantoms" or a folder of
    NIfTI volumes: DIR/*.nii.gz or DIR/images/*.nii.gz, optional DIR/labels/ for Dice vs truth).

    `max_volumes` volumes calibrate, `holdout` others (never calibrated on) measure the INT8 error.
    Raises ArtifactError (bundle not FP32, tampered), InputError (unusable data), OutputError
    (`out_dir` exists without `overwrite`), ValueError (bad options).
    """
    say = progress or (lambda _msg: None)
    clock = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {', '.join(METHODS)}")
    source = load_bundle(bundle_dir, trust_unvalidated=trust_unvalidated)
    if source.precision != "fp32":
        raise ArtifactError(
            f"{source.path}: a {source.precision} bundle; calibration quantizes the FP32 graphs: "
            "export one with `ldseg-export onnx --precision fp32`"
        )
    target = Path(out_dir)
    check_folder_target(target, overwrite, MANIFEST)
    cfg = source.config
    calib_volumes, held_volumes = load_volumes(data, cfg, max_volumes=max_volumes, holdout=holdout)
    say(f"calibrating on {len(calib_volumes)} volume(s), {len(held_volumes)} held out; method {method}")

    say("running the FP32 pipeline on the held-out volumes")
    held_traj = collect(source, held_volumes, threads=threads)

    source_manifest = json.loads((source.path / MANIFEST).read_text())
    graphs: dict[str, QuantizedGraph] = {}
    with (
        tempfile.TemporaryDirectory(prefix="ldseg-quant-") as work_dir,
        staged_folder(target, overwrite=overwrite, marker=MANIFEST) as tmp,
    ):
        work = Path(work_dir)
        prepared = {name: prepare_graph(name, source.graph_path(name), work) for name in source.graphs}
        say(f"running the FP32 pipeline ({source.steps} steps) on the calibration volumes, one at a time")
        samples, timesteps = _calibrate(source, prepared, calib_volumes, method, work, tmp, graphs, threads, say)
        calibration = {
            "tool": f"onnxruntime.quantization.quantize_static {onnxruntime.__version__}",
            "format": "QDQ S8S8 symmetric, per-channel weights, float bias",
            "method": method,
            "ranges": "streaming running min/max, one volume at a time (ldseg.calibration.ranges)"
            if method == "minmax"
            else "onnxruntime histogram calibrator, one sample per collect",
            "data": str(data),
            "volumes": [v.name for v in calib_volumes],
            "holdout": [v.name for v in held_volumes],
        }
        manifest = int8_manifest(source, source_manifest, tmp, graphs, calibration)
        write_manifest(tmp, manifest)

        say("checking the INT8 bundle against FP32 on the held-out volumes")
        quantized = load_bundle(tmp, trust_unvalidated=True)  # being validated here; checks manifest and hashes
        report = CalibrationReport(
            bundle=target,
            source_bundle=source.path,
            source_hash=manifest["source_bundle"]["manifest_sha256"],
            method=method,
            data=str(data),
            calibration_volumes=[v.name for v in calib_volumes],
            holdout_volumes=[v.name for v in held_volumes],
            samples=samples,
            timesteps=sorted(set(timesteps), reverse=True),
            graphs=graphs,
            errors=graph_errors(source, quantized, held_traj, threads=threads),
            volumes=compare_pipelines(source, quantized, held_volumes, threads=threads),
            num_classes=cfg.num_classes,
        )
        report.seconds = time.perf_counter() - clock
        report.write(tmp)
        validation = report.validation()
        write_manifest(tmp, with_validation(manifest, validation))
        if validation["verdict"] != PASSED and not keep_failed:
            raise ArtifactError(f"{target}: INT8 bundle not written: {validation['summary']} (--keep-failed keeps it)")
    say(f"wrote {target}")
    return report


def _calibrate(
    source: Bundle,
    prepared: dict[str, PreparedGraph],
    volumes: list[CalibrationVolume],
    method: str,
    work: Path,
    out: Path,
    graphs: dict[str, QuantizedGraph],
    threads: int | None,
    say: Progress,
) -> tuple[dict[str, int], list[float]]:
    """Calibrate and quantize every prepared graph into `out` (filling `graphs`); returns the
    calibration samples per graph and the t of every denoise_step call. minmax: one streaming pass
    of the pipeline through RangeTrackers (memory of one inference, whatever the number of
    volumes); the histogram methods: recorded graph inputs, one sample per ORT collect."""
    if method == "minmax":
        trackers = {name: RangeTracker(g.path, QUANTIZED_OPS, threads=threads) for name, g in prepared.items()}

        def through(graph: str, feed: Feed) -> np.ndarray | None:
            return trackers[graph].run(feed)[0] if graph in trackers else None

        timesteps = walk(source, volumes, through)
        samples = {name: t.samples for name, t in trackers.items()}
        caches = {name: t.save(work / f"{name}.ranges.json") for name, t in trackers.items()}
        del trackers  # free the sessions before quantizing
        for name, graph in prepared.items():
            say(f"quantizing {name} (ranges from {samples[name]} sample(s))")
            graphs[name] = finish_graph(graph, out / source.graph(name).file, method, cache=caches[name])
        return samples, timesteps
    trajectories = collect(source, volumes, threads=threads)
    for name, graph in prepared.items():
        feeds = trajectories.feeds[name]
        say(f"quantizing {name} on {len(feeds)} sample(s)")
        graphs[name] = finish_graph(graph, out / source.graph(name).file, method, reader=FeedReader(feeds))
    return {name: len(trajectories.feeds[name]) for name in prepared}, trajectories.timesteps
