"""Pre/post-processing on a backend's device (issue 30: the torch backend's torch ops, ONNX
Runtime's ONNX graphs) against the CPU reference path (ldseg.io.preprocess), run here on the CPU:
the same code a GPU runs, float64 interpolation.
The reference is exact scipy arithmetic, so the bar is near-equality: model-grid images and float
maps within 1e-6 / 1e-5, labels identical (float rounding could flip an exact tie between two
classes; the counts are asserted zero on the real knee cases and phantoms here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from ldseg.data.phantoms import blurred_probabilities, make_phantom
from ldseg.errors import InputError
from ldseg.io.preprocess import image_to_model_grid, labels_to_model_grid, probabilities_to_input_grid, zoom_to
from ldseg.model.config import get_preset
from ldseg.runs.inference import segment
from ldseg.runs.types import RunOptions
from ldseg.runs.volumes import map_to_input_grid, prepare, to_input_grid
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import Backend
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.backends.onnxruntime.volume import OrtVolumeOps
from ldseg.runtime.backends.torch import volume as torch_volume
from ldseg.runtime.backends.torch.backend import TorchBackend
from ldseg.runtime.backends.torch.volume import TorchVolumeOps
from ldseg.runtime.volume_ops import DeviceMemoryError, VolumeOps
from tests.helpers import assert_several_classes, shared_or_skip
from tests.reliability.helpers import write_phantoms

KNEE = get_preset("knee3d")
MADE = {
    "torch": lambda: TorchVolumeOps("cpu"),
    "onnxruntime": lambda: OrtVolumeOps([("CPUExecutionProvider", {})], "cpu"),
}


@pytest.fixture(params=sorted(MADE), scope="module")
def ops(request: pytest.FixtureRequest) -> VolumeOps:
    return MADE[request.param]()


@pytest.mark.parametrize("case", ["case1", "case4"])
def test_on_the_knee_cases_the_device_path_equals_the_cpu_path(ops, case):
    image = np.asarray(nib.load(shared_or_skip("knee", "images", f"{case}.nii.gz")).dataobj)
    label = np.asarray(nib.load(shared_or_skip("knee", "labels", f"{case}.nii.gz")).dataobj)
    assert image.dtype == np.int16  # uploaded as read
    ref = image_to_model_grid(image, KNEE.image_size)
    got = ops.to_model_grid(image, KNEE.image_size)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 1e-6
    probs = blurred_probabilities(labels_to_model_grid(label, KNEE.image_size, KNEE.num_classes), KNEE.num_classes)
    labels = ops.labels_on_input_grid(probs, image.shape)
    reference = probabilities_to_input_grid(probs, image.shape)
    assert_several_classes(reference, f"{case} reference labels")
    assert int((labels != reference).sum()) == 0
    mapped = ops.map_on_input_grid(probs[1], image.shape)
    assert float(np.abs(mapped - zoom_to(probs[1], image.shape[::-1]).transpose(2, 1, 0)).max()) <= 1e-5


@pytest.mark.parametrize(
    ("shape", "grid", "dtype"),
    [
        ((20, 36, 40), (32, 64, 64), np.int16),
        ((70, 33, 90), (32, 64, 64), np.uint8),
        ((9, 64, 17), (16, 16, 16), np.float32),
    ],
)
def test_on_phantoms_up_and_down_the_device_path_equals_the_cpu_path(ops, shape, grid, dtype):
    phantom = make_phantom(3, shape)
    raw = phantom.image.transpose(2, 1, 0).astype(dtype)  # nibabel order, as read
    assert float(np.abs(ops.to_model_grid(raw, grid) - image_to_model_grid(raw, grid)).max()) <= 1e-6
    probs = blurred_probabilities(make_phantom(4, grid).label, 3, sigma=1.0)
    np.testing.assert_array_equal(
        ops.labels_on_input_grid(probs, raw.shape), probabilities_to_input_grid(probs, raw.shape)
    )


def test_exact_ties_go_to_the_lower_class_as_on_the_cpu(ops):
    probs = np.zeros((3, 8, 8, 8), np.float32)
    probs[1], probs[2] = 0.5, 0.5  # classes 1 and 2 tie everywhere: argmax takes 1
    probs[0, :4] = 0.9
    labels = ops.labels_on_input_grid(probs, (11, 13, 6))
    np.testing.assert_array_equal(labels, probabilities_to_input_grid(probs, (11, 13, 6)))
    assert set(np.unique(labels)) == {0, 1}


def test_many_classes_give_the_cpu_paths_labels(ops):
    """Eight classes of uneven, off-grid probabilities: ONNX Runtime folds them in one at a time
    (a running best on the device), the torch ops class by class; both must be np.argmax's labels."""
    gen = np.random.default_rng(3)
    logits = gen.normal(size=(8, 9, 10, 12)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=0)
    labels = ops.labels_on_input_grid(probs.astype(np.float32), (17, 14, 23))
    np.testing.assert_array_equal(labels, probabilities_to_input_grid(probs.astype(np.float32), (17, 14, 23)))
    assert len(np.unique(labels)) == 8


@pytest.mark.parametrize("bad", ["constant", "nan"])
def test_a_constant_or_nan_volume_is_refused_in_the_references_words(ops, tmp_path, bad):
    raw = np.full((12, 10, 9), 7.0, np.float32)
    if bad == "nan":
        raw[:] = np.linspace(0, 1, raw.size).reshape(raw.shape)
        raw[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="cannot min-max standardize a constant \\(or NaN\\) image"):
        ops.to_model_grid(raw, (8, 8, 8))
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(raw, np.eye(4)), path)
    with pytest.raises(InputError) as cpu:
        prepare(path, get_preset("demo"))
    with pytest.raises(InputError) as device:
        prepare(path, get_preset("demo"), ops=ops)
    assert str(device.value) == str(cpu.value) and str(cpu.value).startswith(f"{path}: ")


class _FullDevice:
    """Volume ops on a device that is always out of memory."""

    where = "cuda:7"

    def _full(self, *args: object) -> np.ndarray:
        raise DeviceMemoryError("cuda:7: out of memory (Tried to allocate 3.10 GiB)")

    to_model_grid = labels_on_input_grid = map_on_input_grid = _full


def test_a_device_out_of_memory_takes_the_cpu_path_with_a_warning(tmp_path):
    cfg = get_preset("demo")
    (path,) = write_phantoms(tmp_path / "in", 1, tmp_path / "truth")
    with pytest.warns(RuntimeWarning, match=r"p0\.nii\.gz: cuda:7: out of memory .*on the CPU instead"):
        full = prepare(path, cfg, ops=_FullDevice())
    cpu = prepare(path, cfg)
    np.testing.assert_array_equal(full.image, cpu.image)
    probs = blurred_probabilities(make_phantom(0, cfg.image_size).label, 3)  # on the model grid
    with pytest.warns(RuntimeWarning, match="out of memory"):
        np.testing.assert_array_equal(to_input_grid(cpu, probs, _FullDevice()), to_input_grid(cpu, probs))
    with pytest.warns(RuntimeWarning, match="out of memory"):
        np.testing.assert_array_equal(map_to_input_grid(cpu, probs[1], _FullDevice()), map_to_input_grid(cpu, probs[1]))


def test_torch_ops_say_out_of_memory_in_one_error(monkeypatch):
    def full(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.10 GiB (GPU 0; 7.4 GiB total)")

    monkeypatch.setattr(torch_volume, "F", SimpleNamespace(interpolate=full))
    with pytest.raises(DeviceMemoryError, match=r"^cpu: out of memory \(CUDA out of memory\. Tried to allocate 3\.10"):
        TorchVolumeOps("cpu").labels_on_input_grid(np.ones((3, 4, 4, 4), np.float32), (5, 6, 7))


def test_onnxruntime_ops_say_out_of_memory_in_one_error_and_pass_other_errors_on(monkeypatch):
    ops = OrtVolumeOps([("CPUExecutionProvider", {})], "cpu")
    probs = np.ones((3, 4, 4, 4), np.float32)
    for message, raised in [
        (
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer "
            "of size 3325165568",
            DeviceMemoryError,
        ),
        ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type", RuntimeError),
    ]:

        def failing(*args: object, message: str = message) -> None:
            raise RuntimeError(message)

        monkeypatch.setattr(ops._class_step, "run_with_iobinding", failing)
        with pytest.raises(raised) as caught:
            ops.labels_on_input_grid(probs, (5, 6, 7))
        assert type(caught.value) is raised
    assert str(caught.value).startswith("[ONNXRuntimeError] : 2")


def _backends(kind: str, model, bundle: Path) -> tuple[Backend, Backend]:
    if kind == "torch":
        return TorchBackend(model, device_volume=False), TorchBackend(model)  # the torch ops are its default
    return OnnxRuntimeBackend(bundle, threads=2), OnnxRuntimeBackend(bundle, threads=2, device_volume=True)


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_a_run_with_device_volume_ops_writes_what_the_cpu_path_writes(tmp_path, kind, shipped_demo_bundle):
    """The run path's plumbing: prepare, the labels and the K-sample maps through the backend's ops."""
    model = load_model("demo")  # trained: several classes
    [path] = write_phantoms(tmp_path / "in", 1, tmp_path / "truth")
    opts = RunOptions(steps=3, samples=2)
    cpu, device = _backends(kind, model, shipped_demo_bundle)
    ops = device.volume_ops()
    assert cpu.volume_ops() is None and ops is not None
    assert device.describe()["volume_ops"] != cpu.describe()["volume_ops"] == "cpu (numpy/scipy)"
    ref = segment(prepare(path, model.cfg), cpu, model.cfg, opts)
    prepared = prepare(path, model.cfg, ops=ops)
    got = segment(prepared, device, model.cfg, opts)
    assert list(got.outputs) == ["_seg", "_confidence", "_entropy"]
    assert_several_classes(ref.outputs["_seg"][0], "CPU path labels")
    np.testing.assert_array_equal(got.outputs["_seg"][0], ref.outputs["_seg"][0])
    for name in ("_confidence", "_entropy"):
        assert float(np.abs(got.outputs[name][0] - ref.outputs[name][0]).max()) <= 1e-5, name
    # and the run path's helpers hand 3D volumes to the ops
    mean = got.mean_probabilities
    np.testing.assert_array_equal(to_input_grid(prepared, mean, ops), to_input_grid(prepared, mean))
    assert np.abs(map_to_input_grid(prepared, mean[1], ops) - map_to_input_grid(prepared, mean[1])).max() <= 1e-5
