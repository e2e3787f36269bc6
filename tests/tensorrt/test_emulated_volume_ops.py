"""TensorRT's volume operations (ldseg/runtime/backends/tensorrt/volume.py) on the emulated GPU
(tests/tensorrt/emulator.py: the volume engines' float32 graphs through ONNX Runtime on the CPU,
with their profiles enforced), against the CPU reference path (ldseg.io.preprocess, float64).

Float32, so the bar is near-equality measured, not exact arithmetic: model-grid images within 1e-6,
float maps within 1e-5, labels identical (the counts are asserted zero on the real knee cases and
phantoms; a flipped near-tie would show here). The tolerance is shown to catch a changed
resampling rule: half-pixel coordinates instead of scipy's corner-aligned ones fail it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from ldseg.data.phantoms import blurred_probabilities, make_phantom
from ldseg.io import preprocess
from ldseg.io.preprocess import image_to_model_grid, labels_to_model_grid, probabilities_to_input_grid, zoom_to
from ldseg.model.config import get_preset
from ldseg.runs.inference import segment
from ldseg.runs.types import RunOptions
from ldseg.runs.volumes import prepare
from ldseg.runtime import volume_ops
from ldseg.runtime.artifacts.engines import bundle_hash
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import make_inputs
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend
from ldseg.runtime.backends.tensorrt.samples import SAMPLE_ENGINES, TrtDeviceArray
from ldseg.runtime.backends.tensorrt.volume import TrtVolumeOps
from ldseg.runtime.sample_graphs import SAMPLE_GRAPHS
from ldseg.runtime.samples import host
from ldseg.runtime.volume_ops import DeviceMemoryError, DeviceStepUnavailable
from tests.helpers import assert_several_classes, phantom_images, shared_or_skip
from tests.reliability.helpers import write_phantoms
from tests.tensorrt.emulator import ERROR_NAMES, Emulator, emulated_engine_set, emulated_volume_engines, install

pytestmark = pytest.mark.gpu_emulated

KNEE = get_preset("knee3d")
GRID = (32, 64, 64)


@pytest.fixture(scope="module")
def gpu() -> Any:
    with pytest.MonkeyPatch.context() as patch:
        yield install(patch)


def trt_ops(folder: Path, grid: tuple[int, ...], max_input_grid: int = 512) -> TrtVolumeOps:
    """The volume ops over emulated engines for `grid` (the emulator must be installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    engines, _ = emulated_volume_engines(folder, grid, max_input_grid)
    engine_set = SimpleNamespace(
        config=SimpleNamespace(image_size=grid), max_input_grid=max_input_grid, volume_engines=engines
    )
    runtime = sys.modules["tensorrt"].Runtime(None)
    return TrtVolumeOps(
        engine_set, lambda g: runtime.deserialize_cuda_engine((folder / engines[g].file).read_bytes()), 0
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ops(gpu: Emulator, tmp_path_factory: pytest.TempPathFactory) -> TrtVolumeOps:
    return trt_ops(tmp_path_factory.mktemp("volume-engines"), GRID)


@pytest.fixture(scope="module")
def knee_ops(gpu: Emulator, tmp_path_factory: pytest.TempPathFactory) -> TrtVolumeOps:
    return trt_ops(tmp_path_factory.mktemp("knee-volume-engines"), KNEE.image_size)


@pytest.mark.parametrize("case", ["case1", "case4"])
def test_on_the_knee_cases_the_engines_equal_the_cpu_path(knee_ops, gpu, case):
    image = np.asarray(nib.load(shared_or_skip("knee", "images", f"{case}.nii.gz")).dataobj)
    label = np.asarray(nib.load(shared_or_skip("knee", "labels", f"{case}.nii.gz")).dataobj)
    ran = len(gpu.log)
    got = knee_ops.to_model_grid(image, KNEE.image_size)
    assert got.dtype == np.float32 and float(np.abs(got - image_to_model_grid(image, KNEE.image_size)).max()) <= 1e-6
    probs = blurred_probabilities(labels_to_model_grid(label, KNEE.image_size, KNEE.num_classes), KNEE.num_classes)
    reference = probabilities_to_input_grid(probs, image.shape)
    assert_several_classes(reference, f"{case} reference labels")
    assert int((knee_ops.labels_on_input_grid(probs, image.shape) != reference).sum()) == 0
    mapped = knee_ops.map_on_input_grid(probs[1], image.shape)
    assert float(np.abs(mapped - zoom_to(probs[1], image.shape[::-1]).transpose(2, 1, 0)).max()) <= 1e-5
    executed = [e for e in gpu.log[ran:] if e.startswith("execute")]
    assert [e.split()[1] for e in executed] == [
        "volume_to_model_grid",
        *["volume_class_step"] * KNEE.num_classes,
        "volume_map",
    ]  # on the (emulated) GPU, one class step per class


@pytest.mark.parametrize(
    ("shape", "dtype"), [((20, 36, 40), np.int16), ((70, 33, 90), np.uint8), ((9, 64, 17), np.float32)]
)
def test_on_phantoms_up_and_down_the_engines_equal_the_cpu_path(ops, shape, dtype):
    raw = make_phantom(3, shape).image.transpose(2, 1, 0).astype(dtype)  # nibabel order, as read
    assert float(np.abs(ops.to_model_grid(raw, GRID) - image_to_model_grid(raw, GRID)).max()) <= 1e-6
    probs = blurred_probabilities(make_phantom(4, GRID).label, 3, sigma=1.0)
    np.testing.assert_array_equal(
        ops.labels_on_input_grid(probs, raw.shape), probabilities_to_input_grid(probs, raw.shape)
    )
    reference = zoom_to(probs[2], raw.shape[::-1]).transpose(2, 1, 0)
    assert float(np.abs(ops.map_on_input_grid(probs[2], raw.shape) - reference).max()) <= 1e-5


def test_the_tolerance_catches_half_pixel_resampling(ops, monkeypatch):
    """Half-pixel coordinates ((i + 0.5) * in / out - 0.5, as ONNX Resize's default) in the feeds:
    the same graphs then miss the reference by far more than the tests allow."""

    def half_pixel(n_in: int, n_out: int) -> np.ndarray:
        return np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)

    raw = make_phantom(3, (20, 36, 40)).image.transpose(2, 1, 0).astype(np.int16)
    probs = blurred_probabilities(make_phantom(4, GRID).label, 3, sigma=1.0)
    monkeypatch.setattr(volume_ops, "zoom_coordinates", half_pixel)
    assert float(np.abs(ops.to_model_grid(raw, GRID) - image_to_model_grid(raw, GRID)).max()) > 1e-3
    reference = zoom_to(probs[2], raw.shape[::-1]).transpose(2, 1, 0)
    assert float(np.abs(ops.map_on_input_grid(probs[2], raw.shape) - reference).max()) > 1e-3
    assert int((ops.labels_on_input_grid(probs, raw.shape) != probabilities_to_input_grid(probs, raw.shape)).sum()) > 0
    assert preprocess.zoom_coordinates is not half_pixel  # the reference kept scipy's rule


def test_exact_ties_go_to_the_lower_class_and_many_classes_fold_in(ops):
    probs = np.zeros((3, *GRID), np.float32)
    probs[1], probs[2] = 0.5, 0.5  # classes 1 and 2 tie everywhere: argmax takes 1
    probs[0, :16] = 0.9
    np.testing.assert_array_equal(
        ops.labels_on_input_grid(probs, (11, 13, 6)), probabilities_to_input_grid(probs, (11, 13, 6))
    )
    logits = np.random.default_rng(3).normal(size=(8, *GRID)).astype(np.float32)
    many = (np.exp(logits) / np.exp(logits).sum(axis=0)).astype(np.float32)
    labels = ops.labels_on_input_grid(many, (17, 14, 23))
    np.testing.assert_array_equal(labels, probabilities_to_input_grid(many, (17, 14, 23)))
    assert len(np.unique(labels)) == 8


@pytest.mark.parametrize("bad", ["constant", "nan"])
def test_a_constant_or_nan_volume_is_refused_in_the_references_words(ops, bad):
    raw = np.full((12, 10, 9), 7.0, np.float32)
    if bad == "nan":
        raw[:] = np.linspace(0, 1, raw.size).reshape(raw.shape)
        raw[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="cannot min-max standardize a constant \\(or NaN\\) image"):
        ops.to_model_grid(raw, GRID)


def test_a_volume_beyond_the_engines_range_is_resampled_on_the_cpu_with_a_warning(gpu, tmp_path):
    cfg = get_preset("demo")
    small = trt_ops(tmp_path / "engines", cfg.image_size, max_input_grid=64)
    shape = (70, 33, 90)  # two axes beyond the engines' 64
    path = tmp_path / "p0.nii.gz"
    nib.save(nib.Nifti1Image(make_phantom(3, shape[::-1]).image.transpose(2, 1, 0), np.eye(4)), path)
    with pytest.raises(
        DeviceStepUnavailable, match=r"cuda:0: a \(70, 33, 90\) volume is outside .*range \(1\.\.64 voxels per axis"
    ):
        small.to_model_grid(np.zeros(shape, np.float32), cfg.image_size)
    with pytest.warns(RuntimeWarning, match=r"p0\.nii\.gz: cuda:0: a .* volume is outside .*on the CPU instead"):
        prepared = prepare(path, cfg, ops=small)
    np.testing.assert_array_equal(prepared.image, prepare(path, cfg).image)


def test_a_failed_device_allocation_is_one_out_of_memory_error(ops, gpu, monkeypatch):
    from ldseg.runtime.backends.tensorrt import cuda

    cudart = cuda.runtime()
    monkeypatch.setitem(ERROR_NAMES, 2, "cudaErrorMemoryAllocation")
    monkeypatch.setattr(cudart, "cudaMalloc", lambda nbytes: (2, 0))
    with pytest.raises(
        DeviceMemoryError,
        match=r"^cuda:0: out of memory \(CUDA call cudaMalloc\(\d+\) failed: cudaErrorMemoryAllocation\)",
    ):
        ops.labels_on_input_grid(np.ones((3, *GRID), np.float32), (300, 6, 7))  # a new, larger grid allocates


def test_a_run_through_the_tensorrt_backend_writes_what_the_cpu_path_writes(gpu, tmp_path, shipped_demo_bundle):
    """The backend offers its engine set's volume ops, says so, and a K-sample run through them
    gives the CPU path's labels and maps; a set without volume engines keeps the CPU path."""
    model = load_model("demo")  # trained: several classes
    engines = emulated_engine_set(tmp_path / "engines", shipped_demo_bundle)
    without = emulated_engine_set(tmp_path / "engines-without", shipped_demo_bundle, volume_ops=False)
    trt = TensorRTBackend(engines, "cuda", bundle_hash=bundle_hash(shipped_demo_bundle))
    assert TensorRTBackend(without, "cuda").volume_ops() is None
    ops = trt.volume_ops()
    assert ops is not None and trt.describe()["volume_ops"].startswith("TensorRT engines on cuda:0 (float32")
    [path] = write_phantoms(tmp_path / "in", 1, tmp_path / "truth")
    opts = RunOptions(steps=3, samples=2)
    cpu = OnnxRuntimeBackend(shipped_demo_bundle, threads=2)
    ref = segment(prepare(path, model.cfg), cpu, model.cfg, opts)
    got = segment(prepare(path, model.cfg, ops=ops), trt, model.cfg, opts)
    assert_several_classes(ref.outputs["_seg"][0], "CPU path labels")
    np.testing.assert_array_equal(got.outputs["_seg"][0], ref.outputs["_seg"][0])
    for name in ("_confidence", "_entropy"):
        assert float(np.abs(got.outputs[name][0] - ref.outputs[name][0]).max()) <= 1e-5, name
    trt.close()


def test_one_sample_stays_on_the_gpu_for_the_volume_engines(gpu, tmp_path, shipped_demo_bundle):
    """K = 1 with resident=True (the run path's call): the decoder's probabilities are copied device
    to device into the result and the class steps read them there; nothing full-resolution comes
    down. Same mean and votes as the host path, bit for bit, same labels; the kept buffer goes back
    to the pool with the result, the next volume takes it again, and it is freed with the backend."""
    engines = emulated_engine_set(tmp_path / "engines", shipped_demo_bundle)
    trt = TensorRTBackend(engines, "cuda", bundle_hash=bundle_hash(shipped_demo_bundle))
    ops = trt.volume_ops()
    assert isinstance(ops, TrtVolumeOps)
    cfg = trt.config
    inputs = make_inputs(cfg, phantom_images(cfg, [1]), [4], 3)
    on_host = trt.sample(inputs)
    ran = len(gpu.log)
    kept = trt.sample(inputs, resident=True)
    probs_bytes = on_host.mean.nbytes
    copies = [e for e in gpu.log[ran:] if e.startswith("copy")]
    assert f"copy dtod {probs_bytes}" in copies and f"copy dtoh {probs_bytes}" not in copies, copies
    assert isinstance(kept.mean, TrtDeviceArray) and kept.mean.ptr in gpu.memory
    buffer = kept.mean.ptr
    shape = (41, 30, 50)
    ran = len(gpu.log)
    labels = ops.labels_on_input_grid(kept.mean, shape)
    uploads = [e for e in gpu.log[ran:] if e.startswith("copy htod")]
    assert not any(e.endswith(str(probs_bytes // cfg.num_classes)) for e in uploads), uploads  # no class went up
    np.testing.assert_array_equal(labels, ops.labels_on_input_grid(on_host.mean, shape))
    assert_several_classes(labels, "TensorRT labels")
    np.testing.assert_array_equal(
        ops.map_on_input_grid(kept.mean[1], shape), ops.map_on_input_grid(on_host.mean[1], shape)
    )
    np.testing.assert_array_equal(host(kept.mean), on_host.mean)
    np.testing.assert_array_equal(host(kept.votes), on_host.votes)
    made = ops.kept.allocated
    del kept
    assert buffer in gpu.memory and ops.kept.idle() == 1  # back in the pool (no cudaFree per volume)
    again = trt.sample(inputs, resident=True)
    assert again.mean.ptr == buffer and ops.kept.allocated == made  # the next volume takes it again
    np.testing.assert_array_equal(host(again.mean), on_host.mean)
    del again
    trt.close()
    assert buffer not in gpu.memory  # freed with the backend


def test_k_samples_stay_on_the_gpu_through_the_sample_engines(gpu, tmp_path, shipped_demo_bundle):
    """K = 3 with resident=True: each sample added to the running sum by the sample engines on the
    GPU (chunks of 1 and 3), the mean, votes and confidence the host path's bit for bit, the entropy
    within an ulp (float32 division), labels and maps on the input grid as the host result's;
    nothing full-resolution comes down. A set without the sample engines keeps K > 1 on the host."""
    engines = emulated_engine_set(tmp_path / "engines", shipped_demo_bundle)
    trt = TensorRTBackend(engines, "cuda", bundle_hash=bundle_hash(shipped_demo_bundle))
    ops = trt.volume_ops()
    assert isinstance(ops, TrtVolumeOps)
    assert "K samples averaged there too (sample engines, K <= 4)" in trt.describe()["volume_ops"]
    cfg = trt.config
    inputs = make_inputs(cfg, phantom_images(cfg, [1]), [4, 5, 6], 3)
    on_host = trt.sample(inputs, chunk=1)
    entropy = host(on_host.entropy(cfg.num_classes))
    assert float(entropy.max()) > 0  # the samples disagree somewhere: the entropy is not trivially 0
    shape = (41, 30, 50)
    for chunk in (1, 3):
        ran = len(gpu.log)
        kept = trt.sample(inputs, chunk=chunk, resident=True)
        assert isinstance(kept.mean, TrtDeviceArray) and isinstance(kept.votes, TrtDeviceArray)
        executed = [e.split()[1] for e in gpu.log[ran:] if e.startswith("execute sample_")]
        assert executed == ["sample_accumulate"] * 3 + ["sample_mean"], executed
        assert not [e for e in gpu.log[ran:] if e == f"copy dtoh {on_host.mean.nbytes}"]
        np.testing.assert_array_equal(host(kept.mean), on_host.mean)
        np.testing.assert_array_equal(host(kept.votes), on_host.votes)
        confidence = kept.confidence()
        np.testing.assert_array_equal(host(confidence), host(on_host.confidence()))
        np.testing.assert_allclose(host(kept.entropy(cfg.num_classes)), entropy, rtol=0, atol=1.2e-7)
        labels = ops.labels_on_input_grid(kept.mean, shape)
        np.testing.assert_array_equal(labels, ops.labels_on_input_grid(on_host.mean, shape))
        assert_several_classes(labels, "TensorRT labels")
        np.testing.assert_array_equal(
            ops.map_on_input_grid(confidence, shape), ops.map_on_input_grid(host(on_host.confidence()), shape)
        )
        del kept, confidence
    made = ops.kept.allocated
    trt.sample(inputs, resident=True).confidence()
    assert ops.kept.allocated == made  # mean, votes and the map: the pool's buffers again
    trt.close()
    without = emulated_engine_set(tmp_path / "engines-without", shipped_demo_bundle, sample_engines=False)
    old = TensorRTBackend(without, "cuda", bundle_hash=bundle_hash(shipped_demo_bundle))
    assert "K > 1 samples averaged on the host" in old.describe()["volume_ops"]
    assert isinstance(old.sample(inputs, resident=True).mean, np.ndarray)
    old.close()


def test_a_folder_through_segmenter_on_tensorrt_writes_what_the_cpu_path_writes(gpu, tmp_path, shipped_demo_bundle):
    """The local run path end to end on the emulated GPU: backend selection, the reading thread's
    preprocessing and the writing thread's resampling through the volume engines, three volumes
    of two shapes; labels as the same run with --volume-ops cpu writes them."""
    from ldseg.api import Segmenter

    engines = emulated_engine_set(tmp_path / "engines", shipped_demo_bundle)
    paths = write_phantoms(tmp_path / "in", 2, tmp_path / "truth")
    odd = tmp_path / "in" / "odd.nii.gz"  # another input grid, off the model grid's ratios
    nib.save(nib.Nifti1Image(make_phantom(5, (30, 41, 50)).image.transpose(2, 1, 0), np.eye(4)), odd)
    written, ran = {}, len(gpu.log)
    for where in ("auto", "cpu"):
        with Segmenter(engines=engines, backend="tensorrt", device="cuda", steps=3, volume_ops=where) as seg:
            assert (seg.backend.volume_ops() is None) == (where == "cpu")
            summary = seg.write([*paths, odd], tmp_path / where)
        assert not summary.failures and len(summary.written) == 3
        written[where] = {p.name: np.asarray(nib.load(p).dataobj) for p in summary.written}
    executed = [e.split()[1] for e in gpu.log[ran:] if e.startswith("execute volume_")]  # the auto run only
    assert executed.count("volume_to_model_grid") == 3 and executed.count("volume_class_step") == 9
    assert written["auto"].keys() == written["cpu"].keys()
    for name, labels in written["cpu"].items():
        assert len(np.unique(labels)) > 1, name
        np.testing.assert_array_equal(written["auto"][name], labels, err_msg=name)


def test_build_engine_checks_its_volume_engines_and_refuses_a_wrong_rule(
    gpu, tmp_path, shipped_demo_bundle, monkeypatch
):
    """The check build-engine runs before renaming the set into place (export/volume_check.py), on the
    emulated engines: it passes with scipy's rule and records the numbers; with half-pixel
    coordinates in the feeds it refuses the set."""
    from ldseg.errors import ArtifactError
    from ldseg.export.tensorrt_build import _check_volume_engines
    from ldseg.runtime.artifacts.engines import read_engine_set

    engine_set = read_engine_set(emulated_engine_set(tmp_path / "engines", shipped_demo_bundle))
    runtime = sys.modules["tensorrt"].Runtime(None)
    record = _check_volume_engines(engine_set, runtime, 0)
    assert record["passed"] and [c["labels_differing"] for c in record["cases"]] == [0, 0]
    assert [c["input_nib"] for c in record["cases"]] == [[46, 45, 22], [85, 84, 41]]  # off-grid, both ways
    assert all(c["image_max_abs"] <= 1e-6 and c["map_max_abs"] <= 1e-5 for c in record["cases"])

    def half_pixel(n_in: int, n_out: int) -> np.ndarray:
        return np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)

    monkeypatch.setattr(volume_ops, "zoom_coordinates", half_pixel)
    with pytest.raises(ArtifactError, match="volume engines disagree with the CPU path .*--no-volume-ops"):
        _check_volume_engines(engine_set, runtime, 0)


def test_build_engine_checks_its_sample_engines_and_refuses_wrong_arithmetic(
    gpu, tmp_path, shipped_demo_bundle, monkeypatch
):
    """The sample engines' check (export/volume_check.check_sample_engines) on the emulated engines,
    run as the backend runs them: it passes and records the numbers; with the entropy's terms taken
    for another K it refuses the set."""
    from ldseg.errors import ArtifactError
    from ldseg.export.tensorrt_build import _check_sample_engines
    from ldseg.runtime.artifacts.engines import read_engine_set
    from ldseg.runtime.backends.tensorrt import volume
    from ldseg.runtime.samples import entropy_terms

    engine_set = read_engine_set(emulated_engine_set(tmp_path / "engines", shipped_demo_bundle))
    runtime = sys.modules["tensorrt"].Runtime(None)
    before = dict(gpu.memory)
    record = _check_sample_engines(engine_set, runtime, 0, 3)
    assert record["passed"] and record["samples"] == 3 and record["votes_differing"] == 0
    assert record["mean_max_abs"] == 0.0 and record["confidence_max_abs"] == 0.0
    assert record["entropy_max_abs"] <= 1.2e-7
    assert gpu.memory.keys() == before.keys()  # everything it allocated is freed

    monkeypatch.setattr(volume, "entropy_terms", lambda k: entropy_terms(k + 1)[: k + 1])
    with pytest.raises(ArtifactError, match="sample engines disagree with the host path .*--no-volume-ops"):
        _check_sample_engines(engine_set, runtime, 0, 3)


def test_the_sample_engines_a_set_needs_are_the_sample_graphs() -> None:
    assert tuple(SAMPLE_GRAPHS) == SAMPLE_ENGINES


def test_the_gpu_backends_import_no_onnx_until_they_make_a_graph() -> None:
    """onnx (0.6 s of a cold start on this project's CPU) is for building graphs: an engine set's
    runtime never builds one, ONNX Runtime only where its volume or sample graphs first run."""
    code = (
        "import sys\n"
        "import ldseg.runtime.backends.tensorrt.backend, ldseg.runtime.backends.onnxruntime.backend\n"
        "print('onnx' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "False", "importing a GPU backend imported onnx"
