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

Steps: load and verify the FP32 bundle; split the volumes into calibration and held-out sets; run
the real FP32 pipeline (ORT CPU) on the calibration volumes, recording every graph's inputs at
every sampler step; quantize each graph (calibration/quantize.py); write the INT8 bundle (same
manifest, precision "int8", new hashes, `source_bundle` recorded) in a temp folder; load it with
the ordinary bundle loader and run it with OnnxRuntimeBackend against the FP32 bundle on the
held-out volumes; write calibration.json/.md into it; rename it into place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import onnxruntime
except ImportError as exc:  # neither extra installed: say which one
    from ldseg.runtime.ort_env import missing

    raise missing("INT8 calibration") from exc

from ldseg.calibration.data import Trajectories, batches, collect, load_volumes
from ldseg.calibration.quantize import METHODS, QuantizedGraph, quantize_graph
from ldseg.calibration.report import CalibrationReport, compare_pipelines, graph_errors
from ldseg.errors import ArtifactError
from ldseg.io.atomic import check_folder_target, staged_folder
from ldseg.runtime.bundle import MANIFEST, Bundle, load_bundle, sha256_file
from ldseg.runtime.engines import bundle_hash

Progress = Callable[[str], None]
INT8 = "int8"


def int8_manifest(
    source: Bundle, source_manifest: dict[str, Any], folder: Path, graphs: dict[str, QuantizedGraph], calibration: dict[str, Any]
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
    source = load_bundle(bundle_dir)
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

    say(f"running the FP32 pipeline ({source.steps} steps) on the calibration volumes")
    trajectories: Trajectories = collect(source, calib_volumes, threads=threads)
    say("running the FP32 pipeline on the held-out volumes")
    held_traj = collect(source, held_volumes, threads=threads)

    source_manifest = json.loads((source.path / MANIFEST).read_text())
    graphs: dict[str, QuantizedGraph] = {}
    with staged_folder(target, overwrite=overwrite, marker=MANIFEST) as tmp:
        for name in source.graphs:
            feeds = batches(trajectories.feeds[name])
            say(f"quantizing {name} on {len(trajectories.feeds[name])} sample(s)")
            graphs[name] = quantize_graph(name, source.graph_path(name), tmp / source.graph(name).file, feeds, method=method)
        calibration = {
            "tool": f"onnxruntime.quantization.quantize_static {onnxruntime.__version__}",
            "format": "QDQ S8S8 symmetric, per-channel weights, float bias",
            "method": method,
            "data": str(data),
            "volumes": [v.name for v in calib_volumes],
            "holdout": [v.name for v in held_volumes],
        }
        manifest = int8_manifest(source, source_manifest, tmp, graphs, calibration)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

        say("checking the INT8 bundle against FP32 on the held-out volumes")
        quantized = load_bundle(tmp)  # the ordinary loader: manifest, precision, hashes
        report = CalibrationReport(
            bundle=target,
            source_bundle=source.path,
            source_hash=manifest["source_bundle"]["manifest_sha256"],
            method=method,
            data=str(data),
            calibration_volumes=[v.name for v in calib_volumes],
            holdout_volumes=[v.name for v in held_volumes],
            samples={name: len(feeds) for name, feeds in trajectories.feeds.items() if name in source.graphs},
            timesteps=sorted(set(trajectories.timesteps), reverse=True),
            graphs=graphs,
            errors=graph_errors(source, quantized, held_traj, threads=threads),
            volumes=compare_pipelines(source, quantized, held_volumes, threads=threads),
            num_classes=cfg.num_classes,
        )
        report.seconds = time.perf_counter() - clock
        report.write(tmp)
    say(f"wrote {target}")
    return report
