"""QC numbers on phantoms with known answers (ldseg/qc/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ldseg.data.phantoms import make_phantom
from ldseg.metrics import dice_per_class
from ldseg.qc.metrics import VolumeQC, class_stats, count_components, uncertainty_stats, voxel_volume_mm3

NAMES = ["background", "class 1", "class 2"]


@pytest.fixture(scope="module")
def phantom_label() -> np.ndarray:
    label = make_phantom(3).label.copy()  # two superellipsoids: one connected structure per class
    assert set(np.unique(label)) == {0, 1, 2}
    return label


def test_components_known_counts(phantom_label):
    seg = phantom_label.copy()
    stats = class_stats(seg, NAMES, 1.0)
    assert (stats["1"].components, stats["2"].components) == (1, 1)
    # Two detached fragments of class 2 in empty corners: 3 components; class 1 untouched.
    assert seg[:3, :3, :3].max() == 0 and seg[-3:, -3:, -3:].max() == 0
    seg[:2, :2, :2] = 2
    seg[-2:, -2:, -2:] = 2
    stats = class_stats(seg, NAMES, 1.0)
    assert (stats["1"].components, stats["2"].components) == (1, 3)


def test_components_full_connectivity():
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touch at a corner only: one structure
    mask[4, 4, 0] = True
    assert count_components(mask) == 2
    assert count_components(np.zeros((3, 3), dtype=bool)) == 0


def test_volumes_in_mm3(phantom_label):
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    affine[0, 1] = 0.7  # a shear changes nothing: |det| of the 3x3 part is the voxel volume
    assert voxel_volume_mm3(affine) == pytest.approx(3.0)
    stats = class_stats(phantom_label, NAMES, voxel_volume_mm3(affine))
    for c in (1, 2):
        n = int((phantom_label == c).sum())
        assert stats[str(c)].voxels == n
        assert stats[str(c)].volume_mm3 == pytest.approx(3.0 * n)
    assert class_stats(phantom_label, NAMES, None)["1"].volume_mm3 is None  # 2D: pixels only


def test_dice_against_a_reference(phantom_label):
    pred = phantom_label.copy()
    pred[pred.shape[0] // 2 :][pred[pred.shape[0] // 2 :] == 1] = 0  # drop half of class 1
    stats = class_stats(pred, NAMES, 1.0, truth=phantom_label)
    expected = dice_per_class(pred, phantom_label, 3)
    assert stats["1"].dice == pytest.approx(expected[1]) and stats["1"].dice < 0.99
    assert stats["2"].dice == pytest.approx(1.0)


def test_entropy_is_zero_when_all_samples_agree(phantom_label):
    votes = np.repeat(phantom_label[None], 8, axis=0)
    assert uncertainty_stats(votes, phantom_label, 3) == (0.0, 0.0)


def test_entropy_known_value_when_half_the_samples_disagree(phantom_label):
    structure = np.flatnonzero(phantom_label > 0)
    flipped = structure[::5]  # every 5th structure voxel: 2 of 4 samples say background
    votes = np.repeat(phantom_label[None], 4, axis=0).reshape(4, -1)
    votes[:2, flipped] = 0
    votes = votes.reshape(4, *phantom_label.shape)
    entropy, unsure = uncertainty_stats(votes, phantom_label, 3)
    share = flipped.size / structure.size
    assert entropy == pytest.approx(share * math.log(2) / math.log(3), rel=1e-5)  # normalized by log(3)
    assert unsure == pytest.approx(share)  # vote confidence 0.5 < 0.75
    # 3 of 4 agree: confidence 0.75 is not below the threshold, the entropy is not zero
    votes = np.repeat(phantom_label[None], 4, axis=0).reshape(4, -1)
    votes[0, flipped] = 0
    entropy, unsure = uncertainty_stats(votes.reshape(4, *phantom_label.shape), phantom_label, 3)
    assert unsure == 0.0 and entropy > 0


def test_uncertainty_needs_two_samples_and_a_structure(phantom_label):
    assert uncertainty_stats(phantom_label[None], phantom_label, 3) == (None, None)
    empty = np.zeros_like(phantom_label)
    assert uncertainty_stats(np.repeat(empty[None], 2, axis=0), empty, 3) == (None, None)


def test_record_round_trips_through_json(phantom_label):
    import json

    record = VolumeQC("p", "in/p.nii.gz", [64, 64, 32], 8, class_stats(phantom_label, NAMES, 1.0), 0.01, 0.002)
    data = json.loads(record.to_json())
    assert data["format"] == "ldseg-qc/1"
    assert VolumeQC.from_dict(data) == record
