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
    with pytest.raises(InputError, match=r"s: the series has no FrameOfReferenceUID, so a DICOM SEG cannot"):
        _write(out / "seg.dcm", np.zeros(reference.array.shape, np.uint8), reference)  # ... not for a SEG
    assert os.listdir(out) == []


def _strip(files, keyword, value):
    """Delete `keyword` from every slice (value None) or set it (e.g. "" for an empty Type 2 element)."""
    for path in files:
        ds = pydicom.dcmread(path)
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
        ds.save_as(path)


@pytest.mark.parametrize("thickness", [None, ""], ids=["missing", "empty"])
def test_slice_thickness_missing_or_empty_takes_the_spacing_from_positions(tmp_path, thickness):
    files = write_series(
        tmp_path / "s", np.random.default_rng(1).integers(0, 900, (5, 6, 7)).astype(np.int16), spacing=(0.7, 0.9, 2.5)
    )
    _strip(files, "SliceThickness", thickness)
    assert pydicom.dcmread(files[0]).get("SliceThickness", "") in ("", None)
    reference = DICOM.read(tmp_path / "s")
    assert reference.source.slice_spacing == pytest.approx(2.5, rel=1e-6)
    labels = np.zeros(reference.array.shape, np.uint8)
    labels[1:4, 2:5, 1:4] = 1
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "seg.dcm", labels, reference)
    seg = pydicom.dcmread(out / "seg.dcm")
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(2.5) and float(measures.SpacingBetweenSlices) == 2.5
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([0.9, 0.7])


def test_a_seg_for_a_series_without_frame_of_reference_is_refused_before_any_compute(tmp_path):
    """read_volume (the step before the model in every engine) refuses it when a SEG is asked for."""
    from ldseg.model.config import get_preset
    from ldseg.runs.cohort import CohortInput
    from ldseg.runs.outputs import output_suffixes
    from ldseg.runs.steps import plan_volume, read_volume
    from ldseg.runs.types import RunOptions

    files = write_series(tmp_path / "s", np.random.default_rng(2).integers(0, 900, (4, 8, 8)).astype(np.int16))
    _strip(files, "FrameOfReferenceUID", None)
    cfg = get_preset("demo")
    (tmp_path / "out").mkdir()
    for types, refused in ((("dicom-seg",), True), (("nifti",), False)):
        opts = RunOptions(output_types=types)
        plan = plan_volume(CohortInput(tmp_path / "s"), tmp_path / "out", cfg, opts, output_suffixes(cfg, opts), None)
        if refused:
            with pytest.raises(InputError, match=r"/s: the series has no FrameOfReferenceUID") as caught:
                read_volume(plan, cfg, None, None)
            assert "\n" not in str(caught.value)
        else:
            assert read_volume(plan, cfg, None, None).prepared.image.ndim == 4


def test_mixed_frames_of_reference_are_refused(tmp_path):
    files = write_series(tmp_path / "s", np.random.default_rng(3).integers(0, 900, (3, 4, 5)).astype(np.int16))
    _strip(files[:1], "FrameOfReferenceUID", "1.2.3.4")
    with pytest.raises(InputError, match=r"slices in 2 frames of reference"):
        DICOM.read(tmp_path / "s")
