"""K samples kept on the backend's device (issue 30, ldseg/runtime/samples.py and the torch and ONNX
Runtime backends' samples.py): `sample(resident=True)` must give what the host path gives, bit for
bit — the mean, the votes, and the confidence and entropy maps made from them — since only where
they live changes. Run here on the CPU, where the torch backend keeps them as CPU tensors and ONNX
Runtime as CPU OrtValues through the same code a GPU runs (the CUDA events aside); on a GPU,
gpu_check's k_samples row holds the same equalities.

On the trained demo model and phantoms (several classes, checked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ldseg.model.network import LDSeg
from ldseg.runs.inference import infer, on_input_grid, segment
from ldseg.runs.types import RunOptions
from ldseg.runs.volumes import prepare
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import Backend, make_inputs
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.backends.onnxruntime.samples import OrtDeviceArray, OrtSampleGraphs, OrtSampleResult
from ldseg.runtime.backends.torch.backend import TorchBackend
from ldseg.runtime.backends.torch.samples import TorchDeviceArray, TorchSampleResult
from ldseg.runtime.sample_graphs import accumulate_graph, entropy_graph
from ldseg.runtime.samples import DeviceArray, SampleResult, entropy_terms, host, vote_entropy
from tests.helpers import assert_several_classes, phantom_images
from tests.reliability.helpers import write_phantoms

STEPS = 3


@pytest.fixture(scope="module")
def model() -> LDSeg:
    return load_model("demo")


KEPT = {"torch": (TorchSampleResult, TorchDeviceArray), "onnxruntime": (OrtSampleResult, OrtDeviceArray)}


@pytest.fixture(scope="module", params=list(KEPT))
def backend(request: pytest.FixtureRequest, model: LDSeg, shipped_demo_bundle: Path) -> Backend:
    """A backend whose volume ops are on (the torch ops are its default; ONNX Runtime's graphs are
    the default on CUDA only), so results may stay with them."""
    if request.param == "torch":
        return TorchBackend(model)
    return OnnxRuntimeBackend(shipped_demo_bundle, threads=2, device_volume=True)


@pytest.mark.parametrize(("samples", "chunk"), [(1, None), (3, 1), (3, 2), (3, 3)])
def test_kept_samples_equal_the_host_samples_bit_for_bit(backend: Backend, samples: int, chunk: int | None):
    image = phantom_images(backend.config, [2])
    inputs = make_inputs(backend.config, image, list(range(7, 7 + samples)), STEPS)
    on_host = backend.sample(inputs, chunk=chunk)
    kept = backend.sample(inputs, chunk=chunk, resident=True)
    assert isinstance(on_host.mean, np.ndarray) and isinstance(on_host.votes, np.ndarray)
    result_type, array_type = KEPT[backend.name]
    assert isinstance(kept, result_type) and isinstance(kept.mean, array_type) and isinstance(kept.votes, array_type)
    assert kept.chunk == on_host.chunk and kept.samples == on_host.samples == samples
    assert_several_classes(on_host.votes[0], "host votes")
    np.testing.assert_array_equal(host(kept.mean), on_host.mean)
    np.testing.assert_array_equal(host(kept.votes), on_host.votes)
    classes = backend.config.num_classes
    np.testing.assert_array_equal(host(kept.confidence()), host(on_host.confidence()))
    np.testing.assert_array_equal(host(kept.entropy(classes)), host(on_host.entropy(classes)))
    np.testing.assert_array_equal(host(kept.mean[1]), on_host.mean[1])  # a class, still on the device
    assert np.asarray(kept.mean).dtype == np.float32 and len(kept.mean) == classes


@pytest.mark.parametrize(("samples", "classes"), [(1, 2), (2, 3), (5, 3), (8, 4), (9, 5)])
def test_the_device_entropy_is_the_host_vote_entropy(samples: int, classes: int):
    """Every count of votes a voxel can have (random votes over many voxels), against vote_entropy."""
    votes = np.random.default_rng(samples * 10 + classes).integers(0, classes, (samples, 6, 7, 40), dtype=np.uint8)
    votes[:, 0, 0, :classes] = np.arange(classes, dtype=np.uint8)[:, None].T  # unanimous voxels too
    reference = vote_entropy(votes, classes)
    assert float(reference.min()) == 0.0 and (samples == 1 or float(reference.max()) > 0.5)
    on_torch = TorchSampleResult(
        mean=TorchDeviceArray(torch.zeros((classes, 6, 7, 40))),
        votes=TorchDeviceArray(torch.from_numpy(votes)),
        stage_ms={},
        chunk=1,
    )
    np.testing.assert_array_equal(host(on_torch.entropy(classes)), reference)
    device = ("cpu", 0)
    on_ort = OrtSampleResult(
        mean=OrtDeviceArray(
            ort.OrtValue.ortvalue_from_numpy(np.zeros((classes, 6, 7, 40), np.float32)),
            (classes, 6, 7, 40),
            np.float32,
            device,
        ),
        votes=OrtDeviceArray(ort.OrtValue.ortvalue_from_numpy(votes), votes.shape, np.uint8, device),
        stage_ms={},
        chunk=1,
    )
    on_ort.graphs = OrtSampleGraphs([("CPUExecutionProvider", {})], device)
    np.testing.assert_array_equal(host(on_ort.entropy(classes)), reference)


@pytest.mark.parametrize("classes", [1, 2, 3, 5])
def test_the_accumulate_graph_votes_the_first_of_tied_classes_as_np_argmax(classes: int):
    """The votes (ldseg/runtime/sample_graphs.py, ONNX Runtime's and TensorRT's): exact ties between
    any two classes, all classes tied, and random values; strictly greater replaces, as np.argmax.
    Taking the last of tied classes (GreaterOrEqual) fails this."""
    rng = np.random.default_rng(classes)
    p = rng.random((classes, 4, 5, 16)).astype(np.float32)
    for a in range(classes):
        for b in range(a + 1, classes):
            p[b, a, b] = p[a, a, b] = 2.0  # an exact tie at the top
    p[:, 3, 4] = 0.25  # every class tied
    session = ort.InferenceSession(accumulate_graph(classes).SerializeToString(), providers=["CPUExecutionProvider"])
    total, labels = session.run(None, {"total": np.zeros((1, 1, 1, 1), np.float32), "probabilities": p})
    np.testing.assert_array_equal(labels, p.argmax(axis=0).astype(np.uint8))
    np.testing.assert_array_equal(total, p)


@pytest.mark.parametrize(("samples", "classes"), [(2, 3), (8, 4), (9, 5)])
def test_the_float32_entropy_graph_is_within_an_ulp_of_vote_entropy(samples: int, classes: int):
    """TensorRT's entropy (no float64: the division by log(C) in float32) against vote_entropy."""
    votes = np.random.default_rng(samples).integers(0, classes, (samples, 6, 7, 40), dtype=np.uint8)
    graph = entropy_graph(classes, exact=False)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"votes": votes, "terms": entropy_terms(samples), "log_classes": np.array(np.log(classes), np.float32)}
    [got] = session.run(None, feeds)
    reference = vote_entropy(votes, classes)
    ulps = np.abs(got.view(np.int32).astype(np.int64) - reference.view(np.int32).astype(np.int64))
    assert int(ulps.max()) <= 1 and float(reference.max()) > 0.5


def test_confidence_is_the_chosen_class_probability():
    mean = np.array([[0.5, 0.2, 0.3], [0.5, 0.7, 0.3], [0.0, 0.1, 0.4]], np.float32)[:, :, None, None]
    on_host = SampleResult(mean=mean, votes=np.zeros((2, 3, 1, 1), np.uint8), stage_ms={}, chunk=1)
    kept = TorchSampleResult(
        mean=TorchDeviceArray(torch.from_numpy(mean)),
        votes=TorchDeviceArray(torch.zeros(2, 3, 1, 1)),
        stage_ms={},
        chunk=1,
    )
    np.testing.assert_array_equal(host(on_host.confidence())[:, 0, 0], np.float32([0.5, 0.7, 0.4]))
    np.testing.assert_array_equal(host(kept.confidence()), host(on_host.confidence()))


def test_a_backend_without_device_volume_ops_gives_host_arrays(model: LDSeg, shipped_demo_bundle: Path):
    inputs = make_inputs(model.cfg, phantom_images(model.cfg, [1]), [0, 1], STEPS)
    for other in (TorchBackend(model, device_volume=False), OnnxRuntimeBackend(shipped_demo_bundle, threads=2)):
        result = other.sample(inputs, resident=True)
        assert isinstance(result.mean, np.ndarray) and isinstance(result.votes, np.ndarray), other.describe()
    for cpu_path in (TorchBackend(model), OnnxRuntimeBackend(shipped_demo_bundle, threads=2, device_volume=True)):
        cpu_path.volume_path = "cpu"  # --volume-ops cpu: the scipy path takes host arrays
        assert isinstance(cpu_path.sample(inputs, resident=True).mean, np.ndarray), cpu_path.name


def test_the_run_path_keeps_them_and_writes_what_the_host_result_writes(tmp_path: Path, backend: Backend):
    """`segment` (the API's and `ldseg-run`'s per-volume call) hands the ops the kept result: the maps
    written are those of the same ops on the host result, and QC's model-grid arrays come over."""
    [path] = write_phantoms(tmp_path / "in", 1, tmp_path / "truth")
    cfg, ops = backend.config, backend.volume_ops()
    opts = RunOptions(steps=STEPS, samples=2, save_probabilities=True)
    prepared = prepare(path, cfg, ops=ops)
    got = segment(prepared, backend, cfg, opts)
    assert isinstance(got.mean_probabilities, DeviceArray) and isinstance(got.votes, DeviceArray)
    on_host = on_input_grid(prepared, infer(prepared.image, backend, cfg, opts), cfg, opts, ops)
    assert list(got.outputs) == list(on_host.outputs) and "_entropy" in got.outputs
    assert_several_classes(on_host.outputs["_seg"][0], "host-path labels")
    for name, (array, dtype) in on_host.outputs.items():
        assert got.outputs[name][1] is dtype
        np.testing.assert_array_equal(got.outputs[name][0], array, err_msg=name)
    np.testing.assert_array_equal(host(got.votes), host(on_host.votes))
    np.testing.assert_array_equal(host(got.mean_probabilities), host(on_host.mean_probabilities))


def test_gpu_checks_k_samples_row_holds_kept_samples_to_the_host_path(backend: Backend):
    """gpu_check's comparison (run here on the CPU backends): kept results, compared bit for bit."""
    from ldseg.bench.gpu_check.compare import k_samples_within_budget

    inputs = make_inputs(backend.config, phantom_images(backend.config, [3]), [1, 2], STEPS)
    result = k_samples_within_budget(backend, backend, inputs, lambda: None)
    assert result["status"] == "pass", result
    kept = result["resident_equal_to_host"]
    assert kept == {
        "kept": KEPT[backend.name][1].__name__,
        "mean": True,
        "votes": True,
        "confidence": True,
        "entropy_max_abs": 0.0,  # bit for bit here; TensorRT's float32 division may be an ulp off
    }
