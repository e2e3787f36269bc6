"""ldseg/runtime/backends/openvino/backend.py: labels of the trained demo model as PyTorch's (FP32, BF16), INT8
bundles on OpenVINO's integer kernels, BF16 refused on a CPU without it, buffers and compiled models
reused, the compiled-model cache where LDSEG_CACHE says, the precision recorded in the outputs, and
the bench's openvino target. One FP32 and one INT8 bundle of the bundled (trained) demo model are
exported per module: that export is the slow part (minutes on a loaded 2-core machine)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.errors import BackendUnavailable
from ldseg.model.network import LDSeg
from ldseg.runs.local import run_files
from ldseg.runs.types import RunOptions
from ldseg.runtime.artifacts.bundle import load_bundle
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import PipelineInputs, make_inputs
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.backends.openvino import backend as openvino_backend
from ldseg.runtime.backends.torch.backend import TorchBackend

ov = pytest.importorskip("openvino", reason="openvino has no wheel for this platform (the backend is skipped)")
from ldseg.runtime.backends.openvino.backend import OpenVinoBackend  # noqa: E402

FP32_TARGET, BF16_TARGET = 99.9, 99.5  # % identical voxels vs PyTorch FP32 (issue 19)
INT8_TARGET = 99.0  # % identical voxels vs PyTorch FP32 for the small phantom-calibrated INT8 bundle
INT8_VS_ORT = 99.5  # vs ONNX Runtime on the same INT8 bundle (measured 99.88 %; 98.5 % without _keep_concats_float)
GRAPHS = ["encoder", "denoise_step", "decoder", "decoder_argmax"]


@pytest.fixture(scope="module")
def model() -> LDSeg:
    return load_model("demo")  # trained on phantoms: three classes with real boundaries


@pytest.fixture(scope="module")
def bundle_dir(shipped_demo_bundle: Path) -> Path:
    return shipped_demo_bundle  # the trained demo model's bundle


@pytest.fixture(scope="module")
def int8_dir(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ldseg.calibration import calibrate

    out = tmp_path_factory.mktemp("ov-int8") / "demo-int8.bundle"
    calibrate(bundle_dir, "phantoms", out, max_volumes=2, holdout=1, threads=2)
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDSEG_CACHE", str(tmp_path_factory.getbasetemp() / "ldseg-cache"))  # never ~/.cache


def _inputs(model: LDSeg, seed: int, steps: int | None = None) -> PipelineInputs:
    cfg = model.cfg
    image = make_phantom(seed, cfg.image_size, cfg.num_classes).image[None, None].astype(np.float32)
    return make_inputs(cfg, image, [seed], steps)


def _identical(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean() * 100)


def _has_bf16() -> bool:
    return "BF16" in openvino_backend.cpu_capabilities(ov.Core())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_labels_match_the_torch_reference(bundle_dir: Path, model: LDSeg, precision: str) -> None:
    if precision == "bf16" and not _has_bf16():
        pytest.skip("this CPU has no native BF16 (OpenVINO's OPTIMIZATION_CAPABILITIES lacks BF16)")
    backend = OpenVinoBackend(bundle_dir, precision, threads=2)
    for seed in (0, 1):
        inputs = _inputs(model, seed)
        ours, ref = backend.run(inputs), TorchBackend(model).run(inputs)
        assert len(np.unique(ref.labels)) == 3  # a real segmentation, not one class everywhere
        target = FP32_TARGET if precision == "fp32" else BF16_TARGET
        agreement = _identical(ours.labels, ref.labels)
        assert agreement >= target, f"{precision}: {agreement:.3f} % identical labels (target {target})"
    assert backend.describe()["inference_precision_hint"] == {"fp32": "f32", "bf16": "bf16"}[precision]


def test_fp32_pins_the_hint_openvino_would_otherwise_lower(bundle_dir: Path) -> None:
    backend = OpenVinoBackend(bundle_dir, "fp32", threads=2)
    compiled = backend.compiled("encoder", 1)
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32", "float32")
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 2


def test_probabilities_match_and_give_the_same_labels(bundle_dir: Path, model: LDSeg) -> None:
    backend = OpenVinoBackend(bundle_dir, "fp32", threads=2)
    inputs = _inputs(model, 3, steps=6)
    ours, ref = backend.run(inputs, probabilities=True), TorchBackend(model).run(inputs, probabilities=True)
    assert ours.probabilities is not None and ref.probabilities is not None
    error = float(np.abs(ours.probabilities - ref.probabilities).max())
    assert error < 1e-4, f"max abs probability error {error:.2e}"
    assert _identical(ours.labels, backend.run(inputs).labels) == 100.0


def test_buffers_and_compiled_models_are_made_once_per_batch(bundle_dir: Path, model: LDSeg) -> None:
    backend = OpenVinoBackend(bundle_dir, "fp32", threads=2)
    first = backend.run(_inputs(model, 0, steps=3))
    plan = backend.plan(1, 3)
    z_buffers = [z.ctypes.data for z in plan.z]
    again = backend.run(_inputs(model, 0, steps=5))  # another step count: same plan and buffers
    assert backend.allocations == 1 and backend.plan(1, 5) is plan
    assert [z.ctypes.data for z in plan.z] == z_buffers and len(backend._compiled) == 3
    assert first.labels is not again.labels and not np.shares_memory(first.labels, plan.labels)  # caller owns it


def test_bf16_is_refused_on_a_cpu_without_it(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda core: {"FP32", "INT8"})  # e.g. AVX2 only
    with pytest.raises(BackendUnavailable, match=r"bf16 needs a CPU with native BF16 .*FP32, INT8"):
        OpenVinoBackend(bundle_dir, "bf16")
    assert OpenVinoBackend(bundle_dir, "fp32").precision == "fp32"  # fp32 still runs there


def test_precision_must_fit_the_bundle(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert OpenVinoBackend(bundle).precision == "fp32"  # auto: the bundle's own, never a reduced one
    with pytest.raises(BackendUnavailable, match="int8 needs an int8 bundle"):
        OpenVinoBackend(bundle, "int8")
    with pytest.raises(BackendUnavailable, match="runs fp32 bundles"):
        OpenVinoBackend(dataclasses.replace(bundle, precision="fp16"))


def test_compiled_models_are_cached_where_selection_says(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ldseg.runtime.select import Source, select_backend

    monkeypatch.setenv("LDSEG_CACHE", str(tmp_path / "cache"))
    selection = select_backend(Source(bundle=bundle_dir, trust_unvalidated=True), "openvino", "cpu")
    backend = selection.backend
    assert isinstance(backend, OpenVinoBackend) and backend.cache == tmp_path / "cache" / "openvino"
    backend.compiled("decoder_argmax", 1)
    assert any((tmp_path / "cache" / "openvino").iterdir()), "OpenVINO wrote no compiled model to CACHE_DIR"
    assert OpenVinoBackend(bundle_dir, "fp32", threads=2).cache is None  # a bare backend caches nothing


def test_int8_bundle_runs_on_integer_kernels(int8_dir: Path, model: LDSeg) -> None:
    backend = OpenVinoBackend(int8_dir, threads=2)
    assert backend.precision == "int8" and backend.describe()["inference_precision_hint"] == "f32"
    inputs = _inputs(model, 5)
    ours, ref = backend.run(inputs), TorchBackend(model).run(inputs)
    agreement = _identical(ours.labels, ref.labels)
    assert agreement >= INT8_TARGET, f"int8: {agreement:.3f} % identical labels to PyTorch FP32"
    same_graphs = OnnxRuntimeBackend(int8_dir, threads=2).run(inputs)  # the same Q/DQ graphs, other kernels
    agreement = _identical(ours.labels, same_graphs.labels)
    assert agreement >= INT8_VS_ORT, f"int8: {agreement:.3f} % identical labels to ONNX Runtime INT8"
    runtime = backend.compiled("decoder_argmax", 1).get_runtime_model()
    kinds = {
        (op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
        for op in runtime.get_ordered_ops()
    }
    integer = [layer for layer, precision in kinds if precision.lower() in ("i8", "u8")]
    assert "Convolution" in integer, sorted(kinds)


def test_reduced_precision_is_recorded_in_the_output_header(int8_dir: Path, model: LDSeg, tmp_path: Path) -> None:
    phantom = make_phantom(7, model.cfg.image_size, model.cfg.num_classes)
    image = tmp_path / "p7.nii.gz"
    write_phantom_nifti(phantom, image, tmp_path / "p7_truth.nii.gz", overwrite=False)
    (tmp_path / "out").mkdir()
    summary = run_files([image], tmp_path / "out", OpenVinoBackend(int8_dir, threads=2), model.cfg, RunOptions())
    assert not summary.failures and summary.written
    header = nib.load(summary.written[0]).header
    assert header["descrip"].item() == b"ldseg openvino int8"


def test_bench_target_runs_fp32_bf16_from_one_bundle_and_int8_from_the_given_one(
    bundle_dir: Path, int8_dir: Path, model: LDSeg, tmp_path: Path
) -> None:
    from ldseg.bench.targets import Context, Unsupported, build_target

    ctx = Context(model, "cpu", bundle_dir, tmp_path, int8_bundle=int8_dir)
    targets = {p: build_target("openvino", ctx, p) for p in ("fp32", "int8")}
    assert {p: t.backend.precision for p, t in targets.items()} == {"fp32": "fp32", "int8": "int8"}
    assert str(int8_dir) in targets["int8"].source and targets["fp32"].label == "openvino/fp32"
    with pytest.raises(Unsupported, match="int8-bundle"):
        build_target("openvino", Context(model, "cpu", bundle_dir, tmp_path), "int8")
    with pytest.raises(Unsupported):
        build_target("onnxruntime", ctx, "bf16")
    if _has_bf16():
        assert build_target("openvino", ctx, "bf16").backend.precision == "bf16"


def test_matmul_probe_measures_each_cpu_precision() -> None:
    from ldseg.bench.probe import best_peak, measure_openvino_peak

    for dtype in ("fp32", "int8"):
        peak = measure_openvino_peak(dtype, size=128, repeat=2)
        assert peak is not None and peak.gflops > 0 and peak.library == "openvino" and peak.dtype == dtype
    best = best_peak("cpu", "fp32", size=128, repeat=2)
    assert best.library in ("torch", "openvino") and best.gflops > 0
