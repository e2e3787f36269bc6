"""calibrate(): the INT8 bundle loads with the ordinary loader, runs in ONNX Runtime CPU, and
comes with its report; refusals for the wrong inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ldseg.calibration import calibrate
from ldseg.calibration.data import HOLDOUT_SEED0, SAMPLING_SEED, _phantom
from ldseg.errors import ArtifactError, OutputError
from ldseg.runtime.artifacts.bundle import load_bundle
from ldseg.runtime.artifacts.engines import bundle_hash
from ldseg.runtime.backend import make_inputs
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from tests.helpers import assert_several_classes


def test_int8_bundle_loads_and_records_its_source(calibrated, fp32_bundle: Path) -> None:  # noqa: ANN001
    folder, _ = calibrated
    int8, fp32 = load_bundle(folder), load_bundle(fp32_bundle)  # verifies every SHA-256
    assert int8.precision == "int8" and {g.precision for g in int8.graphs.values()} == {"int8"}
    assert list(int8.graphs) == list(fp32.graphs) and int8.config == fp32.config and int8.table == fp32.table
    assert all(int8.files[f] != fp32.files[f] for f in fp32.files)  # new graphs, new hashes
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source_bundle"]["manifest_sha256"] == bundle_hash(fp32_bundle)
    assert manifest["source_bundle"]["precision"] == "fp32"
    assert manifest["calibration"]["method"] == "minmax" and manifest["calibration"]["holdout"] == ["phantom-0"]


def test_int8_bundle_runs_in_onnxruntime_cpu(calibrated) -> None:  # noqa: ANN001
    folder, _ = calibrated
    bundle = load_bundle(folder)
    backend = OnnxRuntimeBackend(bundle, "cpu", threads=2)
    image = np.random.default_rng(0).random((1, *bundle.config.image_shape), dtype=np.float32)
    out = backend.run(make_inputs(bundle.config, image, [0]), probabilities=True)
    assert out.labels.shape == (1, *bundle.config.image_size) and out.labels.dtype == np.uint8
    assert out.probabilities is not None and np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert backend.precision == "int8"


def test_report_is_written_with_its_numbers(calibrated, fp32_bundle: Path) -> None:  # noqa: ANN001
    folder, report = calibrated
    data = json.loads((folder / "calibration.json").read_text())
    markdown = (folder / "calibration.md").read_text()
    assert data["holdout_volumes"] == ["phantom-0"] and len(data["calibration_volumes"]) == 2
    assert set(data["summary"]["dice_int8_vs_fp32"]) == {"1", "2"}
    assert 0.0 <= data["summary"]["label_agreement"] <= 1.0
    assert data["samples"]["denoise_step"] == 2 * len(report.timesteps) == 8
    for graph in ("encoder", "denoise_step", "decoder"):
        error = data["graphs"][graph]["error"]
        assert error["max_abs"] >= 0 and error["max_rel"] < 1.0, (graph, error)
    assert data["graphs"]["decoder_argmax"]["error"]["label_agreement"] > 0.9
    kept = data["graphs"]["denoise_step"]["kept_compute"]
    assert {k["op"] for k in kept} == {"MatMul", "Gemm"} and "Softmax" in data["graphs"]["denoise_step"]["fp32_ops"]
    assert "ReduceMean" in data["graphs"]["denoise_step"]["fp32_ops"]
    assert "Dice INT8 vs FP32" in markdown and "left in FP32" in markdown.replace(
        "Compute nodes deliberately left in FP32", "left in FP32"
    )
    # BN-calibrated random weights (tests/helpers.informative_model): the FP32 reference on the held-out
    # phantom must segment several classes, or agreement with it could not fail.
    fp32 = load_bundle(fp32_bundle)
    held_out = _phantom(fp32.config, HOLDOUT_SEED0).image[None]
    reference = OnnxRuntimeBackend(fp32, "cpu", threads=2).run(make_inputs(fp32.config, held_out, [SAMPLING_SEED]))
    assert_several_classes(reference.labels, "FP32 labels of the held-out phantom")
    assert report.label_agreement > 0.9


def test_refusals(fp32_bundle: Path, calibrated, tmp_path: Path) -> None:  # noqa: ANN001
    folder, _ = calibrated
    with pytest.raises(OutputError, match="--overwrite"):
        calibrate(fp32_bundle, "phantoms", folder)
    with pytest.raises(ValueError, match="choose one of"):
        calibrate(fp32_bundle, "phantoms", tmp_path / "x", method="kl")
    with pytest.raises(ArtifactError, match="calibration quantizes the FP32 graphs"):
        calibrate(folder, "phantoms", tmp_path / "x")  # an int8 bundle as the source
    fp16_like = tmp_path / "fp16.bundle"
    shutil.copytree(fp32_bundle, fp16_like)
    manifest = json.loads((fp16_like / "manifest.json").read_text())
    manifest["precision"] = "fp16"
    (fp16_like / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="ldseg-export onnx --precision fp32"):
        calibrate(fp16_like, "phantoms", tmp_path / "x")
    assert not (tmp_path / "x").exists()
