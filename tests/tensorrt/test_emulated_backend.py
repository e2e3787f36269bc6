"""TensorRTBackend.run end to end on the emulated GPU (tests/tensorrt/emulator.py), against ONNX
Runtime on the same bundle: eager, the first (capturing) call, replays, a failed capture, several
shapes and K samples.

Tolerances: the emulator runs the bundle's own ONNX graphs through ONNX Runtime, so the final
latents and the probabilities must equal the ONNX Runtime backend's to <= 1e-6 relative (max
|delta| / max |reference|) and the labels must be identical, on the trained demo model, whose labels
on phantoms hold several classes (checked on each reference).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from ldseg.errors import ArtifactError
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.engines import bundle_hash
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import PipelineInputs, make_inputs
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend
from tests.helpers import assert_several_classes, phantom_images
from tests.tensorrt.emulator import Emulator, emulated_engine_set

pytestmark = pytest.mark.gpu_emulated

REL = 1e-6  # latents and probabilities vs ONNX Runtime, relative to the reference's largest magnitude
STEPS = 5  # odd: the loop ends in z[1]; 4 (even) is checked too


@pytest.fixture(scope="module")
def model() -> LDSeg:
    return load_model("demo")


@pytest.fixture(scope="module")
def bundle_dir(shipped_demo_bundle: Path) -> Path:
    return shipped_demo_bundle  # the trained demo model's bundle


@pytest.fixture(scope="module")
def engines_dir(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulated_engine_set(tmp_path_factory.mktemp("emulated") / "demo.engines", bundle_dir, max_batch=4)


@pytest.fixture(scope="module")
def ort(bundle_dir: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(bundle_dir)


@pytest.fixture(scope="module")
def images(model: LDSeg) -> np.ndarray:
    return phantom_images(model.cfg, range(4))


def _trt(engines_dir: Path, bundle_dir: Path, cuda_graph: bool) -> TensorRTBackend:
    return TensorRTBackend(engines_dir, "cuda", bundle_hash=bundle_hash(bundle_dir), cuda_graph=cuda_graph)


def _final_latents(backend: TensorRTBackend | OnnxRuntimeBackend, gpu: Emulator | None, inputs: PipelineInputs):
    """The loop's result of the last run of this shape: z[steps % 2] (the loop starts in z[0])."""
    parity = inputs.steps % 2
    if isinstance(backend, OnnxRuntimeBackend):
        return backend.plan(inputs.batch, inputs.steps).pipe.z[parity].host.copy()
    assert gpu is not None
    dev = backend.plan(inputs.batch, inputs.steps).b.z[parity]
    return gpu.view(dev.buffer.ptr, dev.shape, np.float32).copy()


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_equals_onnxruntime(
    trt: TensorRTBackend, gpu: Emulator, ort: OnnxRuntimeBackend, inputs: PipelineInputs, what: str
) -> np.ndarray:
    """One run of each on `inputs`: latents and probabilities within REL, identical labels."""
    got = trt.run(inputs, probabilities=True)
    z_got = _final_latents(trt, gpu, inputs)
    ref = ort.run(inputs, probabilities=True)
    z_ref = _final_latents(ort, None, inputs)
    assert got.probabilities is not None and ref.probabilities is not None
    assert_several_classes(ref.labels, f"{what}: ONNX Runtime labels")
    err_z, err_p = _rel(z_got, z_ref), _rel(got.probabilities, ref.probabilities)
    assert err_z <= REL, f"{what}: final latents differ from ONNX Runtime's by {err_z:.3g} relative > {REL}"
    assert err_p <= REL, f"{what}: probabilities differ from ONNX Runtime's by {err_p:.3g} relative > {REL}"
    same = float((got.labels == ref.labels).mean())
    assert same == 1.0, f"{what}: {100 * same:.4f} % of labels equal ONNX Runtime's"
    return got.labels


def test_eager_equals_onnxruntime(emulated_gpu, engines_dir, bundle_dir, ort, images, model):
    trt = _trt(engines_dir, bundle_dir, cuda_graph=False)
    assert_equals_onnxruntime(trt, emulated_gpu, ort, make_inputs(model.cfg, images[:1], [0], STEPS), "eager")
    assert trt.mode == "eager" and not emulated_gpu.graphs
    trt.close()


def test_a_shapes_first_request_runs_eagerly_and_its_second_captures(
    emulated_gpu, engines_dir, bundle_dir, ort, images, model
):
    """Capture only when it pays (issue 30): a one-volume run never captures. The capturing call
    is the defect of issue 26: capture's eager warm-up ping-pongs through z[0], and the graph then
    started from step STEPS-1's output instead of z_init. Fails without the lifecycle's copy-in
    after a capture attempt (checked by reverting it)."""
    trt = _trt(engines_dir, bundle_dir, cuda_graph=True)
    inputs = make_inputs(model.cfg, images[:1], [0], STEPS)
    assert_equals_onnxruntime(trt, emulated_gpu, ort, inputs, "first call")
    assert not trt._graphs and "graph launch" not in emulated_gpu.log and not emulated_gpu.graphs
    second = make_inputs(model.cfg, images[1:2], [1], STEPS)  # other inputs: the graph must not keep the first's
    assert_equals_onnxruntime(trt, emulated_gpu, ort, second, "second (capturing) call")
    assert trt.mode == "cuda-graph" and len(trt._graphs) == 1
    assert "graph launch" in emulated_gpu.log  # the capturing call's answer came from the graph
    trt.close()


def test_capture_from_the_first_request_when_asked(emulated_gpu, engines_dir, bundle_dir, ort, images, model):
    trt = _trt(engines_dir, bundle_dir, cuda_graph=True)
    trt.capture_from = 1
    assert_equals_onnxruntime(trt, emulated_gpu, ort, make_inputs(model.cfg, images[:1], [0], STEPS), "first call")
    assert len(trt._graphs) == 1 and "graph launch" in emulated_gpu.log
    trt.close()


def test_replays_equal_onnxruntime_and_follow_new_inputs(emulated_gpu, engines_dir, bundle_dir, ort, images, model):
    trt = _trt(engines_dir, bundle_dir, cuda_graph=True)
    requests = [
        make_inputs(model.cfg, images[:1], [0], STEPS),
        make_inputs(model.cfg, images[:1], [1], STEPS),  # new noise
        make_inputs(model.cfg, images[1:2], [0], STEPS),  # new image
        make_inputs(model.cfg, images[:1], [0], STEPS),  # the first request again
    ]
    labels = [assert_equals_onnxruntime(trt, emulated_gpu, ort, r, f"request {k}") for k, r in enumerate(requests)]
    assert len(trt._graphs) == 1, "one capture, then replays"
    assert (labels[0] != labels[1]).any() and (labels[0] != labels[2]).any(), "a replay ignored its new inputs"
    np.testing.assert_array_equal(labels[0], labels[3])
    trt.close()


def test_a_replay_is_one_graph_launch(emulated_gpu, engines_dir, bundle_dir, images, model):
    trt = _trt(engines_dir, bundle_dir, cuda_graph=True)
    inputs = make_inputs(model.cfg, images[:1], [0], STEPS)
    trt.run(inputs, probabilities=True)  # eager
    trt.run(inputs, probabilities=True)  # captures
    emulated_gpu.log.clear()
    trt.run(inputs, probabilities=True)
    eager = [op for op in emulated_gpu.log if op.startswith("execute")]
    replayed = [op for op in emulated_gpu.log if op.startswith("replayed execute")]
    assert eager == [] and emulated_gpu.log.count("graph launch") == 1
    assert len(replayed) == 1 + STEPS + 1  # encoder, the steps, decoder
    trt.close()


def test_a_failed_capture_falls_back_to_eager_with_the_same_results(
    emulated_gpu, engines_dir, bundle_dir, ort, images, model
):
    emulated_gpu.fail_capture = True  # every enqueue inside a capture returns false
    trt = _trt(engines_dir, bundle_dir, cuda_graph=True)
    trt.capture_from = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = make_inputs(model.cfg, images[:1], [2], STEPS)
        assert_equals_onnxruntime(trt, emulated_gpu, ort, first, "the call whose capture failed")
    assert trt.mode == "eager" and trt.fallback_reason is not None and "returned false" in trt.fallback_reason
    assert any("capture failed" in str(w.message) for w in caught)
    assert_equals_onnxruntime(trt, emulated_gpu, ort, make_inputs(model.cfg, images[1:2], [3], STEPS), "after")
    assert not trt._graphs
    trt.close()


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_two_batches_and_two_step_counts(emulated_gpu, engines_dir, bundle_dir, ort, images, model, cuda_graph):
    trt = _trt(engines_dir, bundle_dir, cuda_graph=cuda_graph)
    shapes = [(images[:1], [0], STEPS), (images[:2], [4, 5], STEPS), (images[:2], [6, 7], 4), (images[:1], [8], 4)]
    for image, seeds, steps in shapes * 2:  # each shape's second request captures
        what = f"batch {len(seeds)}, {steps} steps"
        assert_equals_onnxruntime(trt, emulated_gpu, ort, make_inputs(model.cfg, image, seeds, steps), what)
    assert len(trt._graphs) == (4 if cuda_graph else 0)
    trt.close()


def test_labels_without_probabilities_come_from_the_argmax_engine(
    emulated_gpu, engines_dir, bundle_dir, ort, images, model
):
    trt = _trt(engines_dir, bundle_dir, cuda_graph=True)
    inputs = make_inputs(model.cfg, images[:2], [0, 1], STEPS)
    for k in range(3):  # eager, the capturing call, then a replay
        got, ref = trt.run(inputs), ort.run(inputs)
        assert got.probabilities is None
        assert_several_classes(ref.labels, "ONNX Runtime labels")
        np.testing.assert_array_equal(got.labels, ref.labels, err_msg=f"call {k}")
    trt.close()


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_k_samples_equal_onnxruntime(emulated_gpu, engines_dir, bundle_dir, ort, images, model, chunk, cuda_graph):
    """sample(): one encoder run at batch 1, K=3 chains, the decoder in chunks; three times (eager,
    capture, replay)."""
    trt = _trt(engines_dir, bundle_dir, cuda_graph=cuda_graph)
    for seed in (10, 20, 30):
        inputs = make_inputs(model.cfg, images[:1], [seed, seed + 1, seed + 2], STEPS)
        got, ref = trt.sample(inputs, chunk=chunk), ort.sample(inputs, chunk=chunk)
        assert got.chunk == chunk
        assert_several_classes(ref.mean.argmax(0), "ONNX Runtime's mean labels")
        err = _rel(got.mean, ref.mean)
        assert err <= REL, f"seed {seed}: mean probabilities differ by {err:.3g} relative > {REL}"
        np.testing.assert_array_equal(got.votes, ref.votes)
    encodes = [op for op in emulated_gpu.log if "execute encoder" in op]
    assert all("batch 1" in op for op in encodes), encodes
    assert len(trt._graphs) == (1 if cuda_graph else 0)
    trt.close()


def test_k_samples_default_chunk_is_what_the_profile_provisions(emulated_gpu, engines_dir, bundle_dir, images, model):
    trt = _trt(engines_dir, bundle_dir, cuda_graph=True)
    assert trt.decode_chunk(3) == 3 and trt.decode_chunk(8) == 4  # engines built with max batch 4
    with pytest.raises(ArtifactError, match="rebuild with --max-batch 5"):
        trt.sample(make_inputs(model.cfg, images[:1], list(range(5)), STEPS))
    trt.close()


def test_close_frees_every_buffer(emulated_gpu, engines_dir, bundle_dir, images, model):
    trt = _trt(engines_dir, bundle_dir, cuda_graph=True)
    for _ in range(2):  # a shape's second request captures
        trt.sample(make_inputs(model.cfg, images[:1], [0, 1, 2], STEPS), chunk=2)
        trt.run(make_inputs(model.cfg, images[:2], [0, 1], 4))
    assert emulated_gpu.memory and emulated_gpu.graphs
    trt.close()
    assert not emulated_gpu.memory, f"{len(emulated_gpu.memory)} allocations left after close()"
    assert not emulated_gpu.graphs and not emulated_gpu.streams
