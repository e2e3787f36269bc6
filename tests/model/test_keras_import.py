"""Goldens of the official Keras models (../shared/data/official-keras-weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldseg.errors import ArtifactError
from ldseg.model.components import ImageEncoder, LabelDecoder, LabelEncoder
from ldseg.model.config import PRESETS
from ldseg.model.keras_import import load_keras_weights
from ldseg.model.layers import GroupNorm
from tests.helpers import shared_or_skip

pytestmark = pytest.mark.shared


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _dice(pred: np.ndarray, truth: np.ndarray, cls: int) -> float:
    p, t = pred == cls, truth == cls
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


def _load(cls, preset: str, filename: str):
    module = cls(PRESETS[preset]).eval()
    load_keras_weights(module, shared_or_skip("official-keras-weights", filename))
    return module


@pytest.fixture(scope="module")
def knee():
    return np.load(shared_or_skip("official-keras-weights", "golden_knee3d.npz"))


@pytest.fixture(scope="module")
def knee_decoded(knee):
    decoder = _load(LabelDecoder, "knee3d", "labelDecoder3D.hdf5")
    with torch.no_grad():
        return decoder(torch.from_numpy(knee["z_label"]).permute(0, 4, 1, 2, 3)).numpy()[0]


@torch.no_grad()
def test_knee_label_encoder_golden(knee):
    encoder = _load(LabelEncoder, "knee3d", "labelEncoder3D.hdf5")
    z = encoder(torch.from_numpy(knee["label"].astype(np.float32))[:, None]).numpy()[0, 0]
    error = _rel_l2(z, knee["z_label"][0, ..., 0])
    assert error <= 1e-4, f"z_label relative L2 error {error:.2e}"


@torch.no_grad()
def test_knee_image_encoder_golden(knee):
    encoder = _load(ImageEncoder, "knee3d", "imageEncoder3D.hdf5")
    image = torch.from_numpy(knee["image"].astype(np.float32)).permute(0, 4, 1, 2, 3)
    z = encoder(image).numpy()[0, 0]
    error = _rel_l2(z, knee["z_image"][0, ..., 0])
    # 1.7e-3 from the golden, all of it TensorFlow's own float32 summation error in its CPU
    # GroupNormalization statistics (the next test reproduces the golden to < 1e-5 by emulating
    # it); our statistics are exact to float32 rounding, so the port keeps them.
    assert error <= 2.5e-3, f"z_image relative L2 error {error:.2e}"


def _tf_cpu_group_norm(self: GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm as TensorFlow 2.15 computes it on a CPU (batch 1): tf.nn.weighted_moments sums
    each group in one plain float32 running total, channel by channel, position by position, so
    a 4M-element group loses ~1 % of its variance; then tf.nn.batch_normalization."""
    (c,) = self.weight.shape
    per = c // self.groups
    out = np.empty(x.shape, dtype=np.float32)
    weight, bias = self.weight.detach().numpy(), self.bias.detach().numpy()
    for b, sample in enumerate(x.detach().numpy()):
        for g in range(self.groups):
            block = sample[g * per : (g + 1) * per]  # (channels, *grid): TF's summation order
            n = np.float32(block.size)
            mean = np.float32(np.add.accumulate(block.ravel(), dtype=np.float32)[-1] / n)
            square = np.square(block - mean, dtype=np.float32)
            var = np.float32(np.add.accumulate(square.ravel(), dtype=np.float32)[-1] / n)
            inv = (np.float32(1) / np.sqrt(var + np.float32(1e-3))) * weight[g * per : (g + 1) * per]
            shift = bias[g * per : (g + 1) * per] - mean * inv
            out[b, g * per : (g + 1) * per] = block * inv.reshape(-1, *[1] * (x.dim() - 2)) + shift.reshape(
                -1, *[1] * (x.dim() - 2)
            )
    return torch.from_numpy(out)


@torch.no_grad()
def test_knee_image_encoder_golden_with_tensorflow_cpu_statistics(knee, monkeypatch):
    """Where the z_image gap comes from: with TensorFlow's sequential float32 group sums in place of
    our exact ones, every other operation unchanged, the port reproduces the golden (6.8e-7)."""
    monkeypatch.setattr(GroupNorm, "forward", _tf_cpu_group_norm)
    encoder = _load(ImageEncoder, "knee3d", "imageEncoder3D.hdf5")
    image = torch.from_numpy(knee["image"].astype(np.float32)).permute(0, 4, 1, 2, 3)
    error = _rel_l2(encoder(image).numpy()[0, 0], knee["z_image"][0, ..., 0])
    print(f"z_image relative L2 with TensorFlow-CPU group statistics: {error:.2e}")
    assert error <= 1e-5, f"z_image relative L2 error {error:.2e} with TensorFlow-CPU group statistics"


def test_knee_decoder_probabilities_golden(knee, knee_decoded):
    center = knee_decoded[:, 56:72, 56:72, 120:136].transpose(1, 2, 3, 0)
    center_error = np.abs(center - knee["probs_from_z_label_center"][0]).max()
    sampled = knee_decoded.reshape(3, -1).T[knee["probs_from_z_label_sample_index"]]
    sample_error = np.abs(sampled - knee["probs_from_z_label_sample"]).max()
    assert center_error <= 1e-3 and sample_error <= 1e-3, (center_error, sample_error)


def test_knee_decoder_labels_and_dice_golden(knee, knee_decoded):
    labels = knee_decoded.argmax(0)
    agreement = (labels == knee["labels_from_z_label"][0]).mean()
    assert agreement >= 0.999, f"{agreement:.5f} of voxels identical"
    truth = knee["label"][0]
    for cls, official in ((1, 0.962), (2, 0.953)):
        dice = _dice(labels, truth, cls)
        assert abs(dice - official) <= 0.002, f"class {cls}: Dice {dice:.4f} vs official {official}"


@torch.no_grad()
def test_knee_decoder_random_latent_golden(knee):
    decoder = _load(LabelDecoder, "knee3d", "labelDecoder3D.hdf5")
    probs = decoder(torch.from_numpy(knee["z_random"]).permute(0, 4, 1, 2, 3)).numpy()[0]
    center = probs[:, 56:72, 56:72, 120:136].transpose(1, 2, 3, 0)
    assert np.abs(center - knee["probs_from_z_random_center"][0]).max() <= 1e-3
    assert (probs.argmax(0) == knee["labels_from_z_random"][0]).mean() >= 0.999


@torch.no_grad()
def test_glas_goldens():
    golden = np.load(shared_or_skip("official-keras-weights", "golden_glas2d.npz"))
    encoder = _load(LabelEncoder, "glas2d", "labelEncoder.hdf5")
    z_label = encoder(torch.from_numpy(golden["label"]).permute(0, 3, 1, 2)).numpy()[0, 0]
    assert _rel_l2(z_label, golden["z_label"][0, ..., 0]) <= 1e-4
    image_encoder = _load(ImageEncoder, "glas2d", "imageEncoder.hdf5")
    z_image = image_encoder(torch.from_numpy(golden["image"]).permute(0, 3, 1, 2)).numpy()[0, 0]
    assert _rel_l2(z_image, golden["z_image"][0, ..., 0]) <= 1e-4  # 4.9e-5
    with pytest.MonkeyPatch.context() as patch:  # the same TensorFlow-CPU statistics: 5.6e-7
        patch.setattr(GroupNorm, "forward", _tf_cpu_group_norm)
        z_image = image_encoder(torch.from_numpy(golden["image"]).permute(0, 3, 1, 2)).numpy()[0, 0]
    assert _rel_l2(z_image, golden["z_image"][0, ..., 0]) <= 1e-5
    decoder = _load(LabelDecoder, "glas2d", "labelDecoder.hdf5")
    probs = decoder(torch.from_numpy(golden["z_label"]).permute(0, 3, 1, 2)).numpy()[0]
    expected = golden["probs_from_z_label"][0].astype(np.float32).transpose(2, 0, 1)
    assert np.abs(probs - expected).max() <= 1e-3  # golden stored as float16
    assert (probs.argmax(0) == expected.argmax(0)).mean() >= 0.999
    dice = _dice(probs.argmax(0), golden["label"][0, ..., 0], 1)
    assert abs(dice - 0.985) <= 0.002, f"GlaS Dice {dice:.4f}"


def test_wrong_file_for_component_is_refused():
    path = shared_or_skip("official-keras-weights", "imageEncoder3D.hdf5")
    with pytest.raises(ArtifactError, match="do not match"):
        load_keras_weights(LabelDecoder(PRESETS["knee3d"]), path)


def test_2d_file_into_3d_model_is_refused():
    path = shared_or_skip("official-keras-weights", "labelEncoder.hdf5")
    with pytest.raises(ArtifactError):
        load_keras_weights(LabelEncoder(PRESETS["knee3d"]), path)
