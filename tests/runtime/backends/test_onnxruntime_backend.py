"""ldseg/runtime/backends/onnxruntime/backend.py: same contract and labels as TorchBackend, buffers reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ldseg.data.phantoms import make_phantom
from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.export import export_bundle
from ldseg.model.config import get_preset
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import load_bundle
from ldseg.runtime.backend import PipelineInputs, make_inputs
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.backends.torch.backend import TorchBackend
from tests.helpers import assert_replays_follow_inputs, assert_several_classes, replay_requests

LABEL_TARGET = 99.9  # % identical voxels, FP32 ORT vs PyTorch


@pytest.fixture(scope="module")
def model(demo_model: LDSeg) -> LDSeg:
    return demo_model  # random BN-calibrated weights (tests.helpers.informative_model)


@pytest.fixture(scope="module")
def bundle_dir(demo_bundle: Path) -> Path:
    return demo_bundle


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
    assert (
        set(ours.stage_ms) == {"input_copy", "encoder", "loop", "decoder", "output_copy"} and ours.probabilities is None
    )


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
    pipe, plan = backend._pipelines[1], backend._plans[1, 3]

    def buffers() -> tuple[object, ...]:
        return (
            pipe.image.value,
            pipe.z[0].value,
            pipe.z[1].value,
            pipe.labels.value,
            plan.table.value,
            plan.noise.value,
        )

    before = buffers()
    second = backend.run(_inputs([5], steps=3)).labels
    backend.run(_inputs([6], steps=6))  # another step count: same batch buffers, its own table and noise
    assert backend.allocations == 1 and backend._pipelines[1] is pipe and backend._plans[1, 3] is plan
    assert all(a is b for a, b in zip(before, buffers()))
    assert len(pipe.step.bindings) == 3 + 6  # one step binding per (step count, index)
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
    fix = r"no CUDA provider .*pip install -e '\.\[gpu\]' \(onnxruntime-gpu\)"
    with pytest.raises(BackendUnavailable, match=fix):
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
    assert_replays_follow_inputs(
        gpu, OnnxRuntimeBackend(bundle_dir), requests, atol=1e-4, min_agreement=LABEL_TARGET / 100
    )
    assert list(gpu._pipelines) == [2]  # one set of bindings (and captured graphs) served every request


# ---------------------------------------------------------------- the CUDA path, run on CPU
# onnxruntime-gpu is faked: sessions are real CPU sessions that report the providers a scenario
# needs, "CUDA" OrtValues are host ones, and bindings to "cuda" memory bind the same host pointers.
# Everything of ours on the CUDA path (provider options, probing, graph refusal, per-step bindings,
# uploads per run) runs for real.
from ldseg.runtime.backends.onnxruntime import backend as ort_backend  # noqa: E402
from ldseg.runtime.backends.onnxruntime import probe as ort_env  # noqa: E402

REFUSAL = (
    "This session cannot use the graph capture feature as requested by the user as all compute graph nodes "
    "have not been partitioned to the CUDAExecutionProvider"
)


class _Binding:
    def __init__(self, inner: ort.IOBinding):
        self.inner = inner

    def bind_input(self, name, device, device_id, dtype, shape, ptr):  # "cuda" memory is host memory here
        self.inner.bind_input(name, "cpu", 0, dtype, shape, ptr)

    def bind_ortvalue_input(self, name, value):
        self.inner.bind_ortvalue_input(name, value)

    def bind_ortvalue_output(self, name, value):
        self.inner.bind_ortvalue_output(name, value)


class _FakeCudaSessions:
    """InferenceSession stand-in; records the providers asked for."""

    def __init__(self, refuse_graphs: tuple[str, ...] = (), first_provider: str = "CUDAExecutionProvider"):
        self.refuse_graphs, self.first_provider = refuse_graphs, first_provider
        self.asked: list[tuple[str, list]] = []
        self.runs = 0

    def __call__(self, path, options, providers):
        fake = self
        self.asked.append((Path(path).stem, providers))
        name, opts = providers[0]
        if opts.get("enable_cuda_graph") == "1" and Path(path).stem in self.refuse_graphs:
            raise ort_backend.ort_state.Fail(REFUSAL)
        inner = _REAL_SESSION(path, options, providers=["CPUExecutionProvider"])

        class Session:
            def get_providers(self):
                return [fake.first_provider, "CPUExecutionProvider"]

            def io_binding(self):
                return _Binding(inner.io_binding())

            def run_with_iobinding(self, binding, run_options):
                fake.runs += 1
                inner.run_with_iobinding(binding.inner, run_options)

        return Session()


_REAL_SESSION = ort.InferenceSession


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_env, "installed", lambda: {"onnxruntime-gpu": "1.23.0"})
    monkeypatch.setattr(
        ort_backend, "_cuda_value", lambda shape, dtype, gpu: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
    )

    def install(**scenario) -> _FakeCudaSessions:
        sessions = _FakeCudaSessions(**scenario)
        monkeypatch.setattr(ort, "InferenceSession", sessions)
        return sessions

    return install


def test_cuda_path_probes_at_build_and_matches_cpu(
    fake_gpu, bundle_dir: Path, backend: OnnxRuntimeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = fake_gpu()
    gpu = OnnxRuntimeBackend(bundle_dir, device="cuda:1")
    assert sessions.runs == 3 * (2 + 15)  # the probe: up to ORT's capturing run, encoder + 15 steps + decoder
    for _, providers in sessions.asked:
        options = {"device_id": "1", "use_tf32": "0", "enable_cuda_graph": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}
        assert providers[0] == ("CUDAExecutionProvider", options)
    info = gpu.describe()
    assert info["device"] == "cuda:1" and info["cuda_graph"].startswith("on") and info["tf32"] == "off"
    writes: list[tuple[int, ...]] = []
    original = ort_backend._Tensor.write
    monkeypatch.setattr(
        ort_backend._Tensor, "write", lambda self, a: (writes.append(self.host.shape), original(self, a))
    )
    inputs = _inputs([2], steps=7)
    labels = gpu.run(inputs).labels
    assert len(writes) == 4  # image, z_init, the whole table, all noise: no upload per step
    np.testing.assert_array_equal(labels, backend.run(inputs).labels)


def test_a_session_refusing_graph_capture_is_rebuilt_without_and_said(fake_gpu, bundle_dir: Path) -> None:
    fake_gpu(refuse_graphs=("encoder",))
    with pytest.warns(RuntimeWarning, match="encoder runs without a CUDA graph"):
        gpu = OnnxRuntimeBackend(bundle_dir, device="cuda")
    assert gpu.graph_refusals == {"encoder": REFUSAL}
    assert gpu.describe()["cuda_graph"] == f"off for encoder ({REFUSAL})"
    assert not gpu._pipelines[1].encoder.graphs and gpu._pipelines[1].step.graphs


def test_a_silent_fallback_to_cpu_is_refused_at_build(fake_gpu, bundle_dir: Path) -> None:
    fake_gpu(first_provider="CPUExecutionProvider")
    with pytest.raises(BackendUnavailable, match="session runs on CPUExecutionProvider, not CUDA"):
        OnnxRuntimeBackend(bundle_dir, device="cuda")


def test_two_onnxruntime_distributions_are_named_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, bundle_dir: Path
) -> None:
    monkeypatch.setattr(ort_env, "installed", lambda: {"onnxruntime": "1.23.0", "onnxruntime-gpu": "1.23.0"})
    with pytest.raises(
        BackendUnavailable,
        match=r"several onnxruntime distributions .*pip uninstall -y onnxruntime "
        r"onnxruntime-gpu && pip install onnxruntime-gpu",
    ):
        OnnxRuntimeBackend(bundle_dir, device="cuda")
    monkeypatch.setattr(ort_env, "installed", lambda: {"onnxruntime-gpu": "1.23.0"})
    assert "CUDA and cuDNN libraries" in ort_env.cuda_problem(["CPUExecutionProvider"])


def test_the_cudnn_search_setting_is_read_and_checked(monkeypatch):
    from ldseg.runtime.backends.onnxruntime.backend import CUDNN_SEARCH_ENV, cudnn_search

    monkeypatch.delenv(CUDNN_SEARCH_ENV, raising=False)
    assert cudnn_search() == "EXHAUSTIVE"  # ORT's own default until a GPU measurement says otherwise
    monkeypatch.setenv(CUDNN_SEARCH_ENV, "heuristic")
    assert cudnn_search() == "HEURISTIC"
    monkeypatch.setenv(CUDNN_SEARCH_ENV, "fastest")
    with pytest.raises(ValueError, match=f"{CUDNN_SEARCH_ENV}=FASTEST: choose one of EXHAUSTIVE"):
        cudnn_search()
