"""Geometry round trip: a label map written in each format, read back by an independent reader,
lands on the same voxels in physical space as the source it was segmented from.

Sources are oblique (direction cosines off every axis), anisotropic (0.7 x 0.9 x 2.5 mm) and, for
DICOM, written with file names in shuffled slice order. The truth is what the test wrote: voxel
(i, j, k) of the source sits at origin + D @ (spacing * (i, j, k)) in LPS mm. Each written file is
read back without ldseg and without the library that wrote it where one exists: NIfTI (nibabel)
by SimpleITK, NRRD and MetaImage (SimpleITK) by parsing their text headers here, DICOM SEG
(highdicom) by highdicom's reader with slice positions from pydicom headers.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ldseg.io.formats import DICOM, METAIMAGE, NIFTI, NRRD, WRITERS
from ldseg.io.formats.dicom_seg import Algorithm, write_dicom_seg
from ldseg.io.geometry import Geometry
from tests.io.dicom_series import oblique_direction, write_series

SPACING, ORIGIN = (0.7, 0.9, 2.5), (10.1, -3.3, 7.7)
TRUTH = Geometry(SPACING, ORIGIN, tuple(oblique_direction().ravel()))
SHAPE = (10, 8, 6)  # (i, j, k)
TOLERANCE_MM = 1e-4  # DICOM stores positions as 12-16 character decimal strings


def _labels() -> np.ndarray:
    """Three classes, no symmetry: any flip or axis swap changes which voxel holds which label."""
    return np.random.default_rng(1).integers(0, 3, size=SHAPE).astype(np.uint8)


def _image() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 1000, size=SHAPE).astype(np.int16)


def _source(kind: str, folder: Path) -> Path:
    image = _image()
    if kind == "dicom":
        write_series(
            folder / "series",
            image.transpose(2, 1, 0),
            spacing=SPACING,
            origin=ORIGIN,
            direction=oblique_direction(),
            shuffle_seed=3,
        )
        return folder / "series"
    if kind == "nifti":
        path = folder / "source.nii.gz"
        nib.save(nib.Nifti1Image(image, TRUTH.affine()), path)
        return path
    path = folder / f"source.{kind}"
    itk = sitk.GetImageFromArray(image.transpose(2, 1, 0))
    TRUTH.apply_to(itk)
    sitk.WriteImage(itk, str(path))
    return path


def _world(geometry: Geometry, index: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices -> (N, 3) LPS mm."""
    return np.asarray(geometry.origin) + (index * np.asarray(geometry.spacing)) @ geometry.matrix.T


def _vectors(text: str) -> list[list[float]]:
    return [[float(v) for v in group.split(",")] for group in re.findall(r"\(([^)]*)\)", text)]


def _read_nrrd_by_hand(path: Path) -> tuple[np.ndarray, Geometry]:
    raw = path.read_bytes()
    header, data = raw.split(b"\n\n", 1)
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[1:] if ": " in line)
    assert fields["space"] == "left-posterior-superior" and fields["type"] == "unsigned char"
    sizes = [int(v) for v in fields["sizes"].split()]
    axes = np.asarray(_vectors(fields["space directions"]))  # row a = axis a's step in mm
    spacing = np.linalg.norm(axes, axis=1)
    voxels = gzip.decompress(data) if fields["encoding"] == "gzip" else data
    array = np.frombuffer(voxels, np.uint8).reshape(sizes[::-1]).transpose(2, 1, 0)  # fastest axis first
    direction = (axes / spacing[:, None]).T
    return array, Geometry(tuple(spacing), tuple(_vectors(fields["space origin"])[0]), tuple(direction.ravel()))


def _read_metaimage_by_hand(path: Path) -> tuple[np.ndarray, Geometry]:
    raw = path.read_bytes()
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    fields = dict(line.split(" = ", 1) for line in raw[:end].decode().splitlines())
    assert fields["ElementType"] == "MET_UCHAR" and fields["AnatomicalOrientation"] in ("RAI", "LPS")
    sizes = [int(v) for v in fields["DimSize"].split()]
    data = zlib.decompress(raw[end:]) if fields.get("CompressedData") == "True" else raw[end:]
    array = np.frombuffer(data, np.uint8).reshape(sizes[::-1]).transpose(2, 1, 0)
    axes = np.asarray([float(v) for v in fields["TransformMatrix"].split()]).reshape(3, 3)  # row a = axis a
    return array, Geometry(
        tuple(float(v) for v in fields["ElementSpacing"].split()),
        tuple(float(v) for v in fields["Offset"].split()),
        tuple(axes.T.ravel()),
    )


def _read_nifti_with_simpleitk(path: Path) -> tuple[np.ndarray, Geometry]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), Geometry.from_sitk(image)


INDEPENDENT_READERS = {"nifti": _read_nifti_with_simpleitk, "nrrd": _read_nrrd_by_hand, "mha": _read_metaimage_by_hand}


def _assert_on_truth_voxels(points_lps: np.ndarray, labels: np.ndarray, truth: np.ndarray, tolerance: float) -> None:
    """Every read-back voxel maps onto a distinct source voxel that holds the same label."""
    index = np.linalg.solve(TRUTH.matrix @ np.diag(TRUTH.spacing), (points_lps - np.asarray(TRUTH.origin)).T).T
    nearest = np.rint(index)
    error_mm = np.abs((index - nearest) * np.asarray(TRUTH.spacing)).max()
    assert error_mm <= tolerance, f"read-back voxels lie {error_mm:.2e} mm off the source grid"
    nearest = nearest.astype(int)
    assert len({tuple(v) for v in nearest}) == len(nearest), "two read-back voxels on one source voxel"
    inside = np.all((nearest >= 0) & (nearest < np.asarray(SHAPE)), axis=1)
    assert inside.all(), "read-back voxels outside the source volume"
    np.testing.assert_array_equal(labels, truth[tuple(nearest.T)])


@pytest.mark.parametrize("source_kind", ["dicom", "nifti", "nrrd", "mha"])
@pytest.mark.parametrize("output_type", ["nifti", "nrrd", "mha"])
def test_label_map_lands_on_the_source_voxels(tmp_path, source_kind, output_type):
    source = _source(source_kind, tmp_path)
    reader = {"dicom": DICOM, "nifti": NIFTI, "nrrd": NRRD, "mha": METAIMAGE}[source_kind]
    reference = reader.read(source)
    assert reference.array.shape == SHAPE
    np.testing.assert_array_equal(reference.array, _image().astype(np.float32))  # voxels in (i, j, k) order
    truth = _labels()
    target = tmp_path / f"seg{WRITERS[output_type].write_suffix}"
    WRITERS[output_type].write(target, truth, reference, overwrite=False, dtype=np.uint8)

    array, geometry = INDEPENDENT_READERS[output_type](target)
    index = np.indices(array.shape).reshape(3, -1).T
    # NIfTI holds its affine in float32: ~1e-6 mm here, well inside TOLERANCE_MM
    _assert_on_truth_voxels(_world(geometry, index), array[tuple(index.T)], truth, TOLERANCE_MM)


@pytest.mark.parametrize("seg_type", ["binary", "fractional"])
def test_dicom_seg_frames_sit_on_source_slices(tmp_path, seg_type):
    source = _source("dicom", tmp_path)
    reference = DICOM.read(source)
    truth = _labels()
    names, colors = ("background", "femur", "tibia"), ("#000000", "#e69f00", "#56b4e9")
    target = tmp_path / "seg.dcm"
    if seg_type == "binary":
        values = truth
    else:  # probabilities 0.25 .. 1.0 where the class is, 0 elsewhere
        values = np.stack([(truth == c) * (0.25 + 0.75 * (c - 1)) for c in (1, 2)]).astype(np.float32)
    write_dicom_seg(
        target,
        values,
        reference,
        names=names,
        colors=colors,
        algorithm=Algorithm("ab" * 32, {"preset": "test"}),
        seg_type=seg_type,
    )

    seg = hd.seg.segread(target)
    assert seg.SegmentationType == seg_type.upper()
    sources = {}
    for path in source.iterdir():
        ds = pydicom.dcmread(path)
        sources[ds.SOPInstanceUID] = ds
    points, labels = [], []
    for number in range(1, int(seg.NumberOfFrames) + 1):
        frame = seg.PerFrameFunctionalGroupsSequence[number - 1]
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ds = sources[uid]
        # the frame's stated position is its source slice's
        np.testing.assert_allclose(
            frame.PlanePositionSequence[0].ImagePositionPatient, ds.ImagePositionPatient, atol=TOLERANCE_MM
        )
        pixels = seg.get_stored_frame(number) if hasattr(seg, "get_stored_frame") else seg.pixel_array[number - 1]
        rows, cols = np.nonzero(pixels)
        for j, i in zip(rows, cols):
            points.append(_world_of_pixel(ds, i, j))
            labels.append(segment)
            if seg_type == "fractional":  # stored as value / MaximumFractionalValue
                stored = pixels[j, i] / float(seg.MaximumFractionalValue)
                assert abs(stored - (0.25 + 0.75 * (segment - 1))) <= 0.5 / 255
    # the segments cover exactly the foreground voxels, at their places
    _assert_on_truth_voxels(np.asarray(points), np.asarray(labels), truth, TOLERANCE_MM)
    assert len(points) == int((truth > 0).sum())
    described = [seg.get_segment_description(n) for n in (1, 2)]
    assert [d.segment_label for d in described] == ["femur", "tibia"]
    item = seg.SegmentSequence[0]
    algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
    assert (item.SegmentAlgorithmType, algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
        "AUTOMATIC",
        "ldseg",
        "0.1.0",
    )
    assert f"checkpoint_sha256={'ab' * 32}" in str(algorithm.AlgorithmParameters)
    assert list(item.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(230, 159, 0).value)
    assert str(described[0].segmented_property_type.meaning) == "Femur"
    assert seg.DeviceSerialNumber == "ab" * 8
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(sources)


def _world_of_pixel(ds: pydicom.Dataset, i: int, j: int) -> np.ndarray:
    """DICOM PS3.3 C.7.6.2.1.1: column i, row j -> LPS mm, from the source slice's header."""
    position = np.asarray(ds.ImagePositionPatient, float)
    orientation = np.asarray(ds.ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return position + i * col_spacing * orientation[:3] + j * row_spacing * orientation[3:]
