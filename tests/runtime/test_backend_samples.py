"""Backend.sample (ldseg/runtime/backend.py): K samples of one image with one encoder run, the K
chains as one batch and the decoder in chunks, against the way infer ran before issue 26 (the image
repeated K times through the whole pipeline, kept here as the reference).

On the trained demo model and phantoms (labels with several classes, checked). Tolerances:
- K=1: bit-identical to the old path (the same stages on the same batch);
- chunked accumulation: bit-identical to `probabilities.mean(axis=0)` of the same decoder batch;
- K>1 against the old path: the encoder then ran at batch K, whose float32 kernels block the batch
  differently from batch 1, so probabilities move by float rounding (<= 1e-4 absolute) and labels
  may flip only at exact ties (>= 99.99 % identical votes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ldseg.model.network import LDSeg
from ldseg.runs.inference import infer
from ldseg.runs.types import RunOptions
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import Backend, make_inputs
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.backends.openvino.backend import OpenVinoBackend
from ldseg.runtime.backends.torch.backend import TorchBackend
from tests.helpers import assert_several_classes, phantom_images

STEPS = 4
MEAN_ATOL = 1e-4
MIN_VOTE_AGREEMENT = 0.9999


@pytest.fixture(scope="module")
def model() -> LDSeg:
    return load_model("demo")


@pytest.fixture(scope="module")
def bundle_dir(shipped_demo_bundle: Path) -> Path:
    return shipped_demo_bundle  # the trained demo model's bundle


@pytest.fixture(scope="module")
def image(model: LDSeg) -> np.ndarray:
    return phantom_images(model.cfg, [1])[0]


@pytest.fixture(scope="module", params=["torch", "onnxruntime", "openvino"])
def backend(request: pytest.FixtureRequest, model: LDSeg, bundle_dir: Path) -> Backend:
    if request.param == "torch":
        return TorchBackend(model)
    if request.param == "onnxruntime":
        return OnnxRuntimeBackend(bundle_dir, threads=2)
    return OpenVinoBackend(bundle_dir, threads=2, cache=False)


def old_infer(image: np.ndarray, backend: Backend, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """session.infer before issue 26: the image repeated K times, one batch of K, mean on the host."""
    batch = np.repeat(image[None], len(seeds), axis=0)
    result = backend.run(make_inputs(backend.config, batch, seeds, STEPS), probabilities=True)
    assert result.probabilities is not None
    return result.probabilities.mean(axis=0), result.labels


def test_one_sample_is_bit_identical_to_the_old_path(backend: Backend, image: np.ndarray) -> None:
    old_mean, old_votes = old_infer(image, backend, [5])
    new = backend.sample(make_inputs(backend.config, image[None], [5], STEPS))
    assert_several_classes(old_votes, f"{backend.name}: old labels")
    np.testing.assert_array_equal(new.mean, old_mean)
    np.testing.assert_array_equal(new.votes, old_votes)


def test_k_samples_match_the_old_path(backend: Backend, image: np.ndarray) -> None:
    seeds = [5, 6, 7]
    old_mean, old_votes = old_infer(image, backend, seeds)
    new = backend.sample(make_inputs(backend.config, image[None], seeds, STEPS))
    assert new.chunk == 1 and new.votes.shape == (3, *backend.config.image_size)
    assert_several_classes(old_mean.argmax(0), f"{backend.name}: old mean labels")
    err = float(np.abs(new.mean - old_mean).max())
    assert err <= MEAN_ATOL, f"{backend.name}: mean probabilities differ by {err:.3g} > {MEAN_ATOL}"
    same = float((new.votes == old_votes).mean())
    assert same >= MIN_VOTE_AGREEMENT, f"{backend.name}: {100 * same:.4f} % identical votes"
    assert (new.votes[0] != new.votes[1]).any(), "the samples did not differ: the seeds were not used"


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_accumulation_is_the_mean_of_the_decoder_outputs(
    model: LDSeg, bundle_dir: Path, image: np.ndarray, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sum runs sample by sample in float32, as probabilities.mean(axis=0) adds them: the same
    bits as the mean of every chunk's decoder output held at once."""
    backend = OnnxRuntimeBackend(bundle_dir, threads=2)
    outputs: list[tuple[np.ndarray, np.ndarray]] = []
    copy_out = backend.copy_out

    def keep(plan, probabilities):  # type: ignore[no-untyped-def]
        labels, probs = copy_out(plan, probabilities)
        outputs.append((labels, probs.copy()))
        return labels, probs

    monkeypatch.setattr(backend, "copy_out", keep)
    inputs = make_inputs(model.cfg, image[None], [1, 2, 3], STEPS)
    got = backend.sample(inputs, chunk=chunk)
    assert [len(labels) for labels, _ in outputs] == [min(chunk, 3 - s) for s in range(0, 3, chunk)]
    np.testing.assert_array_equal(got.mean, np.concatenate([p for _, p in outputs]).mean(axis=0))
    np.testing.assert_array_equal(got.votes, np.concatenate([labels for labels, _ in outputs]))
    if chunk == 3:  # one chunk: the whole batch's run, as `run` gives it
        whole = backend.run(inputs, probabilities=True)
        assert whole.probabilities is not None
        np.testing.assert_array_equal(got.mean, whole.probabilities.mean(axis=0))


def test_the_encoder_runs_once_at_batch_1_and_the_decoder_per_chunk(
    model: LDSeg, bundle_dir: Path, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = OnnxRuntimeBackend(bundle_dir, threads=2)
    calls: list[tuple[str, int]] = []
    for stage in ("encode", "decode"):
        original = getattr(backend, stage)

        def spy(plan, *args, _stage=stage, _original=original):  # type: ignore[no-untyped-def]
            calls.append((_stage, plan.pipe.batch))
            return _original(plan, *args)

        monkeypatch.setattr(backend, stage, spy)
    result = backend.sample(make_inputs(model.cfg, image[None], [0, 1, 2, 3, 4], STEPS), chunk=2)
    assert calls == [("encode", 1), ("decode", 2), ("decode", 2), ("decode", 1)]
    assert set(result.stage_ms) >= {"input_copy", "encoder", "loop", "decoder", "output_copy", "accumulate"}


def test_the_batch_k_plan_never_builds_an_encoder_or_a_decoder(
    model: LDSeg, bundle_dir: Path, image: np.ndarray
) -> None:
    """What bounds the memory: at batch K only the (tiny) step graph exists."""
    inputs = make_inputs(model.cfg, image[None], [0, 1, 2], STEPS)
    onnx = OnnxRuntimeBackend(bundle_dir, threads=2)
    onnx.sample(inputs)
    pipe = onnx._pipelines[3]
    assert "step" in vars(pipe) and not {"encoder", "argmax"} & set(vars(pipe)) and pipe.decoder is None
    vino = OpenVinoBackend(bundle_dir, threads=2, cache=False)
    vino.sample(inputs)
    plan = vino._plans[3]
    assert "step" in vars(plan) and not {"encoder", "argmax"} & set(vars(plan)) and plan.decoder is None
    assert {key[1] for key in vino._compiled if key[0] in ("encoder", "decoder")} == {1}


def test_the_encoder_at_batch_1_gives_the_z_image_of_batch_k(model: LDSeg, bundle_dir: Path, image: np.ndarray) -> None:
    """The bundle's encoder has a dynamic batch: batch 1, broadcast, is the batch-K encoding up to
    float32 blocking (the rows of the batch-K run are identical to each other)."""
    session = ort.InferenceSession(str(bundle_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    one = session.run(None, {name: image[None]})[0]
    many = session.run(None, {name: np.repeat(image[None], 3, axis=0)})[0]
    assert many.shape[0] == 3 and one.shape[0] == 1
    err = float(np.abs(many - one).max() / np.abs(one).max())
    assert err <= 1e-5, f"ONNX encoder: batch 3 rows differ from batch 1 by {err:.3g} relative"
    with torch.no_grad():
        t_one = model.encode_image(torch.from_numpy(image[None])).numpy()
        t_many = model.encode_image(torch.from_numpy(np.repeat(image[None], 3, axis=0))).numpy()
    t_err = float(np.abs(t_many - t_one).max() / np.abs(t_one).max())
    assert t_err <= 1e-5, f"torch encoder: batch 3 rows differ from batch 1 by {t_err:.3g} relative"


def test_infer_with_one_sample_is_unchanged(model: LDSeg, image: np.ndarray) -> None:
    backend = TorchBackend(model)
    result = infer(image, backend, model.cfg, RunOptions(steps=STEPS, seed=3, samples=1))
    mean, votes = result.mean, result.votes
    old_mean, old_votes = old_infer(image, backend, [3])
    np.testing.assert_array_equal(mean, old_mean)
    np.testing.assert_array_equal(votes, old_votes)
