"""ldseg/io/formats/dicom_seg.py: refusals and atomic writing (geometry: test_round_trip.py)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ldseg.errors import InputError, OutputError
from ldseg.io.formats import DICOM, NIFTI
from ldseg.io.formats.dicom_seg import Algorithm, write_dicom_seg
from tests.io.dicom_series import write_series

NAMES, COLORS = ("background", "a", "b"), ("#000000", "#e69f00", "#56b4e9")


def _series(tmp_path):
    write_series(tmp_path / "s", np.random.default_rng(0).integers(0, 900, (4, 5, 6)).astype(np.int16))
    return DICOM.read(tmp_path / "s")


def _write(path, values, reference, **kwargs):
    write_dicom_seg(path, values, reference, names=NAMES, colors=COLORS, algorithm=Algorithm("f" * 64), **kwargs)


def test_a_non_dicom_source_is_refused_in_one_sentence(tmp_path):
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32), np.eye(4)),
        tmp_path / "scan.nii.gz",
    )
    reference = NIFTI.read(tmp_path / "scan.nii.gz")
    with pytest.raises(InputError, match=r"scan.nii.gz: DICOM SEG output needs a DICOM series as input") as caught:
        _write(tmp_path / "seg.dcm", np.zeros((6, 5, 4), np.uint8), reference)
    assert str(caught.value).count(".") <= 3 and "\n" not in str(caught.value)
    assert not (tmp_path / "seg.dcm").exists()


def test_existing_seg_is_kept_and_nothing_is_left_behind(tmp_path):
    reference = _series(tmp_path)
    labels = np.zeros(reference.array.shape, np.uint8)
    labels[1:3, 2:4, 1:3] = 1
    labels[4, 0, 0] = 2
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "seg.dcm", labels, reference)
    before = (out / "seg.dcm").read_bytes()
    with pytest.raises(OutputError, match="exists"):
        _write(out / "seg.dcm", labels * 0, reference)
    with pytest.raises(OutputError, match="must end in .dcm"):
        _write(out / "seg.nii.gz", labels, reference)
    with pytest.raises(ValueError, match="shape"):
        _write(out / "other.dcm", labels[:-1], reference)
    assert os.listdir(out) == ["seg.dcm"] and (out / "seg.dcm").read_bytes() == before
    _write(out / "seg.dcm", labels, reference, overwrite=True)
    assert pydicom.dcmread(out / "seg.dcm").Modality == "SEG"


def test_a_series_without_frame_of_reference_cannot_be_referenced(tmp_path):
    files = write_series(tmp_path / "s", np.random.default_rng(0).integers(0, 900, (3, 4, 5)).astype(np.int16))
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    reference = DICOM.read(tmp_path / "s")  # fine for a NIfTI output ...
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"s: cannot reference this series in a DICOM SEG"):
        _write(out / "seg.dcm", np.zeros(reference.array.shape, np.uint8), reference)  # ... not for a SEG
    assert os.listdir(out) == []
