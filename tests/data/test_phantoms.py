from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldseg.data.phantoms import MIN_FRACTION, make_phantom, write_phantom_nifti
from ldseg.errors import OutputError
from ldseg.io.nifti import read_label_volume, read_volume
from ldseg.io.preprocess import image_to_model_grid, labels_to_model_grid, min_max_standardize


def test_deterministic_per_seed() -> None:
    a, b, c = make_phantom(7), make_phantom(7), make_phantom(8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(12))
def test_shapes_fractions_and_contrast(seed: int) -> None:
    ph = make_phantom(seed)
    assert ph.image.shape == ph.label.shape == (32, 64, 64)
    assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
    # raw scanner-like values: whole numbers in int16 range, not standardized
    np.testing.assert_array_equal(ph.image, np.round(ph.image))
    assert -32768 <= ph.image.min() and ph.image.max() <= 32767
    assert set(np.unique(ph.label)) == {0, 1, 2}
    means = [float(ph.image[ph.label == c].mean()) for c in range(3)]
    assert means[0] < means[1] < means[2]  # class order is learnable from intensity
    for c in (1, 2):
        assert (ph.label == c).mean() >= MIN_FRACTION
    for axis in range(3):  # structures lie inside the field of view
        assert not np.take(ph.label, [0, -1], axis=axis).any()


@pytest.mark.parametrize("seed", range(4))
def test_2d(seed: int) -> None:
    ph = make_phantom(seed, shape=(96, 80))
    assert ph.image.shape == ph.label.shape == (96, 80)
    assert set(np.unique(ph.label)) == {0, 1, 2}
    for c in (1, 2):
        assert (ph.label == c).mean() >= MIN_FRACTION


def test_binary_and_bad_arguments() -> None:
    ph = make_phantom(0, shape=(16, 32, 32), num_classes=2)
    assert set(np.unique(ph.label)) == {0, 1}
    with pytest.raises(ValueError):
        make_phantom(0, num_classes=5)
    with pytest.raises(ValueError):
        make_phantom(0, shape=(4, 4, 4, 4))


def test_nifti_round_trip_reproduces_model_arrays(tmp_path: Path) -> None:
    ph = make_phantom(3)
    img_path, lab_path = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    write_phantom_nifti(ph, img_path, lab_path, overwrite=False)

    on_disk = nib.load(img_path)
    assert on_disk.get_data_dtype() == np.int16
    assert on_disk.shape == (64, 64, 32)  # nibabel order
    np.testing.assert_array_equal(on_disk.header.get_zooms(), (1.0, 1.0, 1.0))
    assert int(on_disk.header["qform_code"]) == int(on_disk.header["sform_code"]) == 1
    assert nib.load(lab_path).get_data_dtype() == np.uint8

    vol = read_volume(img_path)
    np.testing.assert_array_equal(image_to_model_grid(vol.array, ph.image.shape), min_max_standardize(ph.image))
    labels = read_label_volume(lab_path)
    np.testing.assert_array_equal(labels_to_model_grid(labels.array, ph.label.shape, 3), ph.label)


def test_nifti_refuses_overwrite_before_writing_anything(tmp_path: Path) -> None:
    ph = make_phantom(1, shape=(16, 16, 16))
    img_path, lab_path = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    lab_path.write_text("keep me")
    with pytest.raises(OutputError, match="exists"):
        write_phantom_nifti(ph, img_path, lab_path, overwrite=False)
    assert not img_path.exists() and lab_path.read_text() == "keep me"
    write_phantom_nifti(ph, img_path, lab_path, overwrite=True)
    assert read_label_volume(lab_path).array.shape == (16, 16, 16)
