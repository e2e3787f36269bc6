"""ldseg/runtime/onnxruntime_backend.py: same contract and labels as TorchBackend, buffers reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ldseg.data.phantoms import make_phantom
from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.export import export_bundle
from ldseg.model.config import get_preset
from ldseg.model.network import LDSeg
from tests.conftest import informative_model
from tests.helpers import assert_replays_follow_inputs, assert_several_classes, replay_requests
from ldseg.runtime.backend import PipelineInputs, make_inputs
from ldseg.runtime.bundle import load_bundle
from ldseg.runtime.onnxruntime_backend import OnnxRuntimeBackend
from ldseg.runtime.torch_backend import TorchBackend

LABEL_TARGET = 99.9  # % identical voxels, FP32 ORT vs PyTorch


@pytest.fixture(scope="module")
def model() -> LDSeg:
    return informative_model("demo")


@pytest.fixture(scope="module")
def bundle_dir(model: LDSeg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    graphs = ["encoder", "denoise_step", "decoder", "decoder_argmax"]  # all a runtime uses
    return export_bundle(model, tmp_path_factory.mktemp("ort") / "demo.bundle", graphs=graphs)


@pytest.fixture(scope="module")
def backend(bundle_dir: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(bundle_dir)


def _image(seed: int, batch: int = 1) -> np.ndarray:
    """`batch` phantoms (seeds seed, seed+1, ...) as (B, 1, *grid)."""
    cfg = get_preset("demo")
    return np.stack([make_phantom(seed + i, cfg.image_size, cfg.num_classes).image[None] for i in range(batch)])


def _inputs(seeds: list[int], steps: int | None = None, sampler: str | None = None) -> PipelineInputs:
    return make_inputs(get_preset("demo"), _image(seeds[0], len(seeds)), seeds, steps, sampler)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean() * 100)


@pytest.mark.parametrize(("steps", "sampler"), [(None, None), (4, "ddpm")])  # 15 (odd) and 4 (even) steps
def test_labels_match_the_torch_backend(
    backend: OnnxRuntimeBackend, model: LDSeg, steps: int | None, sampler: str | None
) -> None:
    inputs = _inputs([0], steps, sampler)
    ours, ref = backend.run(inputs), TorchBackend(model).run(inputs)
    assert ours.labels.dtype == np.uint8 and ours.labels.shape == (1, *model.cfg.image_size)
    assert_several_classes(ref.labels, "torch labels")  # a real segmentation, so agreement can fail
    agreement = _agreement(ours.labels, ref.labels)
    assert agreement >= LABEL_TARGET, f"{agreement:.3f} % identical labels"
    assert set(ours.stage_ms) == {"encoder", "loop", "decoder"} and ours.probabilities is None


def test_probabilities_match_and_give_the_same_labels(backend: OnnxRuntimeBackend, model: LDSeg) -> None:
    inputs = _inputs([3], steps=6)
    ours = backend.run(inputs, probabilities=True)
    ref = TorchBackend(model).run(inputs, probabilities=True)
    assert ours.probabilities is not None and ref.probabilities is not None
    assert ours.probabilities.shape == (1, 3, *model.cfg.image_size)
    assert_several_classes(ref.labels, "torch labels")
    assert np.abs(ours.probabilities - ref.probabilities).max() < 1e-4
    assert _agreement(ours.labels, backend.run(inputs).labels) == 100.0


def test_buffers_are_allocated_once_per_batch_and_reused(bundle_dir: Path) -> None:
    backend = OnnxRuntimeBackend(bundle_dir)
    first = backend.run(_inputs([5], steps=3)).labels
    pipe = backend._pipelines[1]
    buffers = (pipe.image.value, pipe.z[0].value, pipe.z[1].value, pipe.noise.value, pipe.labels.value)
    second = backend.run(_inputs([5], steps=3)).labels
    backend.run(_inputs([6], steps=6))  # another step count: same buffers
    assert backend.allocations == 1 and backend._pipelines[1] is pipe
    assert all(a is b for a, b in zip(buffers, (pipe.image.value, pipe.z[0].value, pipe.z[1].value, pipe.noise.value, pipe.labels.value)))
    np.testing.assert_array_equal(first, second)  # reusing buffers leaks nothing between runs
    first[...] = 255  # returned labels are copies, not views of the reused buffer
    assert not (backend.run(_inputs([5], steps=3)).labels == 255).all()
    backend.run(_inputs([5, 6], steps=3))
    assert backend.allocations == 2


def test_batch_of_two_equals_two_single_runs(backend: OnnxRuntimeBackend) -> None:
    cfg, images = get_preset("demo"), _image(7, 2)
    both = backend.run(make_inputs(cfg, images, [7, 8], 5)).labels
    singles = [backend.run(make_inputs(cfg, images[i : i + 1], [7 + i], 5)).labels for i in range(2)]
    np.testing.assert_array_equal(both, np.concatenate(singles))


def test_describe_says_what_runs(backend: OnnxRuntimeBackend) -> None:
    info = backend.describe()
    assert info["backend"] == "onnxruntime" and info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["providers"] == "CPUExecutionProvider" and info["preset"] == "demo"


def test_wrong_input_shape_is_refused(backend: OnnxRuntimeBackend) -> None:
    glas = get_preset("glas2d")
    bad = make_inputs(glas, np.zeros((1, *glas.image_shape), np.float32), [0], steps=2)
    with pytest.raises(ValueError, match="image has shape"):
        backend.run(bad)


def test_cuda_without_onnxruntime_gpu_is_unavailable(bundle_dir: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here; the refusal path cannot be exercised")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        OnnxRuntimeBackend(bundle_dir, device="cuda")
    with pytest.raises(ValueError, match="device"):
        OnnxRuntimeBackend(bundle_dir, device="tpu")


def test_bundle_without_the_runtime_graphs_is_refused(model: LDSeg, tmp_path: Path) -> None:
    partial = export_bundle(model, tmp_path / "partial", graphs=["decoder"])
    with pytest.raises(ArtifactError, match="no 'encoder' graph"):
        OnnxRuntimeBackend(load_bundle(partial))


@pytest.mark.cuda
def test_cuda_graph_replays_equal_cpu_and_follow_new_inputs(bundle_dir: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    gpu = OnnxRuntimeBackend(bundle_dir, device="cuda")
    requests = replay_requests(get_preset("demo"), _image(0, 4))  # captured on the first, replayed on the others
    assert_replays_follow_inputs(gpu, OnnxRuntimeBackend(bundle_dir), requests, atol=1e-4,
                                 min_agreement=LABEL_TARGET / 100)
    assert list(gpu._pipelines) == [2]  # one set of bindings (and captured graphs) served every request
