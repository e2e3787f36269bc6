"""ldseg/io/geometry.py: ITK (LPS spacing/origin/direction) <-> NIfTI (RAS affine), exactly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ldseg.io.geometry import Geometry
from tests.io.dicom_series import oblique_direction


def _oblique() -> Geometry:
    return Geometry((0.7, 0.9, 2.5), (10.1, -3.3, 7.7), tuple(oblique_direction().ravel()))


def test_affine_places_voxels_where_simpleitk_does():
    geometry = _oblique()
    image = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    geometry.apply_to(image)
    affine = geometry.affine()
    for index in [(0, 0, 0), (3, 1, 5), (2, 4, 1)]:
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        ras = affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-12)


def test_from_affine_inverts_affine():
    geometry = _oblique()
    back = Geometry.from_affine(geometry.affine())
    np.testing.assert_allclose(back.spacing, geometry.spacing, atol=1e-12)
    np.testing.assert_allclose(back.origin, geometry.origin, atol=1e-12)
    np.testing.assert_allclose(back.direction, geometry.direction, atol=1e-12)


def test_from_affine_agrees_with_simpleitk_reading_the_nifti(tmp_path):
    """An independent reader (ITK's NIfTI IO) of a nibabel-written file sees the same geometry."""
    affine = _oblique().affine()
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), affine), tmp_path / "a.nii.gz")
    itk = Geometry.from_sitk(sitk.ReadImage(str(tmp_path / "a.nii.gz")))
    ours = Geometry.from_affine(affine)
    np.testing.assert_allclose(itk.spacing, ours.spacing, atol=1e-5)
    np.testing.assert_allclose(itk.origin, ours.origin, atol=1e-5)
    np.testing.assert_allclose(itk.direction, ours.direction, atol=1e-5)


def test_problems_are_named():
    assert _oblique().problem() is None
    assert "not positive" in str(Geometry((0.0, 1.0, 1.0), (0, 0, 0), tuple(np.eye(3).ravel())).problem())
    assert "degenerate" in str(Geometry((1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 1, 0, 0, 0, 0, 1)).problem())
    assert "non-finite" in str(Geometry((1.0, 1.0, 1.0), (np.nan, 0, 0), tuple(np.eye(3).ravel())).problem())
