"""Real TensorRT: build engines from the demo model's bundles and compare with the torch reference.

These need TensorRT (`pip install -e '.[tensorrt]'`) and an NVIDIA GPU; elsewhere they skip with
the reason. Tolerances (labels on phantoms, demo model, 15 DDIM steps):
    FP32 engines: >= 99.9 % of voxels equal to torch FP32
    FP16 engines: >= 99.5 %
    INT8 engines: per-class Dice vs. the phantom truth within 1 point of torch FP32's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.metrics import agreement, dice_per_class
from ldseg.runtime.artifacts.engines import Environment, bundle_hash, engine_set_problems, read_engine_set
from ldseg.runtime.backend import make_inputs
from ldseg.runtime.backends.tensorrt.probe import detect_environment
from tests.helpers import assert_replays_follow_inputs, assert_several_classes, replay_requests

pytestmark = pytest.mark.tensorrt

SEEDS = (0, 1, 2, 3)  # evaluation phantoms (never used for training or calibration)
MIN_AGREEMENT = {"fp32": 0.999, "fp16": 0.995}
MAX_INT8_DICE_DROP = 0.01


@pytest.fixture(scope="module")
def environment() -> Environment:
    try:
        return detect_environment()
    except BackendUnavailable as exc:
        pytest.skip(f"needs real TensorRT and an NVIDIA GPU: {exc}")


@pytest.fixture(scope="module")
def model(environment: Environment):  # noqa: ANN201 - LDSeg
    from ldseg.runtime.artifacts.source import load_model

    try:
        return load_model("demo")
    except ArtifactError as exc:
        pytest.skip(f"needs the trained demo model: {exc}")


@pytest.fixture(scope="module")
def phantoms(model) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    from ldseg.data.phantoms import make_phantom
    from ldseg.io.preprocess import min_max_standardize

    cfg = model.cfg
    out = []
    for seed in SEEDS:
        ph = make_phantom(seed, shape=cfg.image_size, num_classes=cfg.num_classes)
        out.append((min_max_standardize(ph.image)[None].astype(np.float32), ph.label))
    return out


@pytest.fixture(scope="module")
def reference(model, phantoms) -> list[np.ndarray]:  # noqa: ANN001
    """torch FP32 labels, the reference every engine is compared with."""
    import torch

    from ldseg.runtime.backends.torch.backend import TorchBackend

    backend = TorchBackend(model, "cuda" if torch.cuda.is_available() else "cpu", cuda_graph=False)
    return [backend.run(make_inputs(model.cfg, img[None], [s])).labels[0] for s, (img, _) in zip(SEEDS, phantoms)]


@pytest.fixture(scope="module")
def bundles(model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: ANN001
    from ldseg.calibration import calibrate
    from ldseg.export import export_bundle

    root = tmp_path_factory.mktemp("trt-bundles")
    out = {
        "fp32": export_bundle(model, root / "fp32"),
        "fp16": export_bundle(model, root / "fp16", precision="fp16"),
    }
    calibrate(out["fp32"], "phantoms", root / "int8", max_volumes=8, holdout=2)
    out["int8"] = root / "int8"
    return out


@pytest.fixture(scope="module")
def engines(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ldseg.export.tensorrt_build import build_engines

    root = tmp_path_factory.mktemp("trt-engines")
    cache = root / "timing.cache"
    return {p: build_engines(b, root / p, max_batch=2, timing_cache=cache) for p, b in bundles.items()}


def _labels(engines_dir: Path, model, phantoms, **kwargs) -> list[np.ndarray]:  # noqa: ANN001
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend

    with TensorRTBackend(engines_dir, **kwargs) as backend:
        return [backend.run(make_inputs(model.cfg, img[None], [s])).labels[0] for s, (img, _) in zip(SEEDS, phantoms)]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_agree_with_torch(precision, engines, model, phantoms, reference) -> None:  # noqa: ANN001
    labels = _labels(engines[precision], model, phantoms)
    for seed, ref in zip(SEEDS, reference):
        assert_several_classes(ref, f"torch FP32 labels of phantom {seed}")
    worst = min(agreement(a, b) for a, b in zip(labels, reference))
    assert worst >= MIN_AGREEMENT[precision], f"{precision}: {100 * worst:.3f} % of voxels agree with torch FP32"


def test_int8_dice_within_one_point(engines, model, phantoms, reference) -> None:  # noqa: ANN001
    labels = _labels(engines["int8"], model, phantoms)
    k = model.cfg.num_classes
    for seed, (_, truth) in zip(SEEDS, phantoms):
        assert_several_classes(truth, f"truth of phantom {seed}")
    for c in range(1, k):
        fp32 = np.mean([dice_per_class(r, t, k)[c] for r, (_, t) in zip(reference, phantoms)])
        int8 = np.mean([dice_per_class(q, t, k)[c] for q, (_, t) in zip(labels, phantoms)])
        assert fp32 - int8 <= MAX_INT8_DICE_DROP, f"class {c}: Dice FP32 {fp32:.4f}, INT8 {int8:.4f}"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_graph_replay_equals_per_step_launches(precision, engines, model, phantoms) -> None:  # noqa: ANN001
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend

    # Captured on the first request (batch 2), replayed on new seeds, then on new images.
    requests = replay_requests(model.cfg, np.stack([image for image, _ in phantoms]))
    with (
        TensorRTBackend(engines[precision], cuda_graph=True) as graph,
        TensorRTBackend(engines[precision], cuda_graph=False) as eager,
    ):
        replayed = assert_replays_follow_inputs(graph, eager, requests, atol=1e-6, min_agreement=1.0)
        assert graph.describe()["mode"] == "cuda-graph", graph.fallback_reason
        assert list(graph._graphs) == [(2, 2, model.cfg.diffusion.steps, True, True)]  # one capture served all three
        stepped = eager.run(requests[0], probabilities=True)
    assert all(set(out.stage_ms) == {"input_copy", "graph", "output_copy"} for out in replayed)
    assert set(stepped.stage_ms) == {"input_copy", "encoder", "loop", "decoder", "output_copy"}


def test_batch_of_two_equals_two_single_runs(engines, model, phantoms) -> None:  # noqa: ANN001
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend

    image = np.stack([phantoms[0][0], phantoms[1][0]])
    with TensorRTBackend(engines["fp32"]) as backend:
        pair = backend.run(make_inputs(model.cfg, image, [0, 1])).labels
        singles = [backend.run(make_inputs(model.cfg, image[i : i + 1], [i])).labels[0] for i in range(2)]
        labels_only = backend.run(make_inputs(model.cfg, image[:1], [0]), probabilities=False).labels[0]
        with pytest.raises(ArtifactError, match="--max-batch 3"):
            backend.run(make_inputs(model.cfg, np.repeat(image[:1], 3, axis=0), [0, 1, 2]))
    for i in range(2):
        assert_several_classes(singles[i], f"phantom {i}, run alone")
    assert min(agreement(pair[i], singles[i]) for i in range(2)) >= 0.9999
    np.testing.assert_array_equal(labels_only, singles[0])


def test_engine_set_describes_this_machine(engines, environment: Environment, bundles) -> None:  # noqa: ANN001
    for precision, folder in engines.items():
        es = read_engine_set(folder)
        assert (es.precision, es.tensorrt_version, es.gpu_name) == (
            precision,
            environment.trt_version,
            environment.gpu_name,
        )
        assert engine_set_problems(folder, environment, bundle_hash=bundle_hash(bundles[precision])) == []
        assert (folder / "encoder.layers.json").is_file()
        assert es.volume_engines and es.builder["volume_check"]["passed"]  # build-engine ran its check


def test_volume_engines_equal_the_cpu_path(engines, model) -> None:  # noqa: ANN001
    """The float32 pre/post-processing engines against scipy's float64 path on an off-grid phantom
    (on the emulator: tests/tensorrt/test_emulated_volume_ops.py)."""
    from ldseg.data.phantoms import blurred_probabilities, make_phantom
    from ldseg.io.preprocess import image_to_model_grid, probabilities_to_input_grid, zoom_to
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend

    grid = model.cfg.image_size
    raw = make_phantom(3, (90, 33, 70)).image.transpose(2, 1, 0).astype(np.int16)  # nibabel order, as read
    probs = blurred_probabilities(make_phantom(4, grid).label, 3, sigma=1.0)
    with TensorRTBackend(engines["fp32"]) as backend:
        ops = backend.volume_ops()
        assert ops is not None, backend.describe()["volume_ops"]
        image = ops.to_model_grid(raw, grid)
        labels = ops.labels_on_input_grid(probs, raw.shape)
        mapped = ops.map_on_input_grid(probs[1], raw.shape)
    assert float(np.abs(image - image_to_model_grid(raw, grid)).max()) <= 1e-6
    reference = probabilities_to_input_grid(probs, raw.shape)
    assert_several_classes(reference, "CPU path labels")
    assert int((labels != reference).sum()) == 0
    assert float(np.abs(mapped - zoom_to(probs[1], raw.shape[::-1]).transpose(2, 1, 0)).max()) <= 1e-5


def test_k_samples_kept_on_the_gpu_equal_the_host_samples(engines, model, phantoms) -> None:  # noqa: ANN001
    """K = 2 through the sample engines (built for --max-batch 2) against the host path: mean, votes
    and confidence equal, vote entropy within an ulp (on the emulator: test_emulated_volume_ops.py)."""
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend
    from ldseg.runtime.backends.tensorrt.samples import TrtDeviceArray
    from ldseg.runtime.samples import host

    inputs = make_inputs(model.cfg, phantoms[0][0][None], [0, 1])
    with TensorRTBackend(engines["fp32"]) as backend:
        assert read_engine_set(engines["fp32"]).builder["sample_check"]["passed"]
        on_host, kept = backend.sample(inputs), backend.sample(inputs, resident=True)
        assert isinstance(kept.mean, TrtDeviceArray) and isinstance(kept.votes, TrtDeviceArray)
        classes = model.cfg.num_classes
        np.testing.assert_array_equal(host(kept.mean), on_host.mean)
        np.testing.assert_array_equal(host(kept.votes), on_host.votes)
        np.testing.assert_array_equal(host(kept.confidence()), host(on_host.confidence()))
        entropy = host(kept.entropy(classes)) - host(on_host.entropy(classes))
        assert float(np.abs(entropy).max()) <= 2.4e-7
