"""Bundles of the official Keras weights reproduce the official outputs through ONNX Runtime.

Goldens: ../shared/data/official-keras-weights (computed with the official TensorFlow code).
The decoder graph is checked against them directly. The encoder graph min-max standardizes its
input on the model grid, while the golden z_image was computed from an image standardized before
resampling, so the encoder graph is checked against PyTorch with the official weights on the
golden image (PyTorch vs the golden z_image is tests/model/test_keras_import.py's job).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ldseg.export import export_bundle
from ldseg.model.config import get_preset
from ldseg.model.keras_import import load_keras_weights
from ldseg.model.network import LDSeg
from tests.helpers import shared_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.shared]


def _run(path: Path, feed: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {session.get_inputs()[0].name: feed})[0]
    return out


@pytest.fixture(scope="module")
def knee(tmp_path_factory: pytest.TempPathFactory) -> tuple[LDSeg, Path, dict[str, np.ndarray]]:
    weights = shared_or_skip("official-keras-weights")
    golden = dict(np.load(weights / "golden_knee3d.npz"))
    torch.manual_seed(0)
    model = LDSeg(get_preset("knee3d"))
    load_keras_weights(model.image_encoder, weights / "imageEncoder3D.hdf5")
    load_keras_weights(model.label_decoder, weights / "labelDecoder3D.hdf5")
    # Compared with the goldens below; the export's own validation would add minutes at this size.
    folder = tmp_path_factory.mktemp("knee") / "knee3d.bundle"
    bundle = export_bundle(model.eval(), folder, graphs=["encoder", "decoder"], validate=False)
    return model, bundle, golden


def test_knee3d_decoder_onnx_reproduces_official_labels(knee: tuple[LDSeg, Path, dict[str, np.ndarray]]) -> None:
    _, bundle, golden = knee
    z_label = np.ascontiguousarray(golden["z_label"].transpose(0, 4, 1, 2, 3))  # (1,8,8,16,1) -> (1,1,8,8,16)
    probs = _run(bundle / "decoder.onnx", z_label)[0]
    agreement = (probs.argmax(0) == golden["labels_from_z_label"][0]).mean() * 100
    assert agreement >= 99.9, f"{agreement:.3f} % identical labels"
    center = probs[:, 56:72, 56:72, 120:136].transpose(1, 2, 3, 0)
    error = np.abs(center - golden["probs_from_z_label_center"][0]).max()
    assert error <= 1e-3, f"center probabilities: max abs error {error:.2e}"


def test_knee3d_encoder_onnx_matches_pytorch_on_the_golden_image(
    knee: tuple[LDSeg, Path, dict[str, np.ndarray]],
) -> None:
    model, bundle, golden = knee
    image = np.ascontiguousarray(golden["image"].astype(np.float32).transpose(0, 4, 1, 2, 3))
    got = _run(bundle / "encoder.onnx", image)
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(image)).numpy()
    # GroupNorm over 4M voxels per group: 2.3e-4 on max |ref| 3.0 with one ReduceMean per group,
    # ~1e-6 relative since the statistics reduce in two levels (layers.GroupNorm).
    error = np.abs(got - ref).max()
    assert error <= 2e-5 * np.abs(ref).max(), f"max abs error {error:.2e} (max |ref| {np.abs(ref).max():.3g})"


def test_glas2d_decoder_onnx_reproduces_official_probabilities(tmp_path: Path) -> None:
    weights = shared_or_skip("official-keras-weights")
    golden = np.load(weights / "golden_glas2d.npz")
    torch.manual_seed(0)
    model = LDSeg(get_preset("glas2d"))
    load_keras_weights(model.label_decoder, weights / "labelDecoder.hdf5")
    bundle = export_bundle(model.eval(), tmp_path / "glas2d.bundle", graphs=["decoder"], validate=False)
    probs = _run(bundle / "decoder.onnx", np.ascontiguousarray(golden["z_label"].transpose(0, 3, 1, 2)))[0]
    expected = golden["probs_from_z_label"][0].astype(np.float32).transpose(2, 0, 1)
    assert np.abs(probs - expected).max() <= 1e-3  # golden stored as float16
    assert (probs.argmax(0) == expected.argmax(0)).mean() >= 0.999
