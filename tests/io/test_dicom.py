"""ldseg/io/formats/dicom.py: DICOM series in, on real files written by others and on fuzzed headers.

Real DICOM comes from installed wheels (../shared/docs/dicom-test-data.md): nibabel's two-slice
Siemens MR series, and pydicom's CT/MR test files in several transfer syntaxes (made into
two-slice series by shifting ImagePositionPatient: the pixel data stays as its writer encoded it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale

from ldseg.errors import InputError
from ldseg.io.formats import DICOM
from ldseg.model.config import PRESETS
from ldseg.runs.local import run_files
from ldseg.runs.types import RunOptions
from tests.io.dicom_series import ROOT, write_series

NIBABEL_DICOM = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"


def world_of_voxel(ds: pydicom.Dataset, i: float, j: float) -> np.ndarray:
    """DICOM PS3.3 C.7.6.2.1.1: column i, row j of a slice -> patient (LPS) mm, from its header."""
    position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return position + i * col_spacing * row_dir + j * row_spacing * col_dir


def real_series(folder: Path, source: Path, slices: int = 2, gap: float = 5.0) -> list[Path]:
    """`slices` copies of one real file, `gap` mm apart along its normal, as one series."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(slices):
        ds = pydicom.dcmread(source)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(ds.ImagePositionPatient, float) + k * gap * normal]
        ds.SOPInstanceUID = f"{ROOT}.77.{k + 1}"
        ds.InstanceNumber = k + 1
        path = folder / f"slice{slices - k}.dcm"  # names in reverse order of position
        ds.save_as(path)
        files.append(path)
    return files


# --------------------------------------------------------------------------- real files


def test_nibabel_siemens_series_geometry_and_voxels(tmp_path):
    folder = tmp_path / "mr"
    folder.mkdir()
    shutil.copy(NIBABEL_DICOM / "1.dcm", folder / "a.dcm")  # file names in reverse slice order
    shutil.copy(NIBABEL_DICOM / "0.dcm", folder / "b.dcm")
    volume = DICOM.read(folder)
    assert volume.array.shape == (256, 256, 2)
    assert [p.name for p in volume.source.files] == ["b.dcm", "a.dcm"]  # sorted by position, not name
    for k, name in enumerate(["0.dcm", "1.dcm"]):
        ds = pydicom.dcmread(NIBABEL_DICOM / name)
        np.testing.assert_array_equal(volume.array[:, :, k], ds.pixel_array.T.astype(np.float32))
        for i, j in [(0, 0), (255, 0), (17, 200)]:
            ras = volume.affine @ np.array([i, j, k, 1.0])
            # Slice 1 sits 0.016 mm off the normal of slice 0 (IOP is rounded to 6 digits in the file):
            # the grid places it on the normal, within that.
            np.testing.assert_allclose(ras[:3] * [-1, -1, 1], world_of_voxel(ds, i, j), atol=0.02)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_transfer_syntaxes_written_by_others_decode_to_the_same_voxels(tmp_path, name):
    real_series(tmp_path / "s", Path(get_testdata_file(name)), slices=3, gap=2.5)
    volume = DICOM.read(tmp_path / "s")
    expected = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.T.astype(np.float32)
    assert volume.array.shape == (64, 64, 3)
    for k in range(3):
        np.testing.assert_array_equal(volume.array[:, :, k], expected)
    assert volume.geometry.spacing == pytest.approx((0.3125, 0.3125, 2.5))


def test_ct_rescale_is_applied(tmp_path):
    real_series(tmp_path / "ct", Path(get_testdata_file("CT_small.dcm")))
    volume = DICOM.read(tmp_path / "ct")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    np.testing.assert_array_equal(volume.array[:, :, 0], apply_rescale(ds.pixel_array, ds).T.astype(np.float32))
    assert volume.array.min() < 0  # Hounsfield units, not stored values


def test_twelve_bit_lossy_jpeg_is_refused_not_decoded_to_garbage(tmp_path):
    """GDCM here prints 'Unsupported JPEG data precision 12' and returns an image anyway."""
    source = tmp_path / "nm.dcm"
    ds = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1]
    ds.save_as(source)
    real_series(tmp_path / "s", source)
    with pytest.raises(InputError, match=r"slice\d.dcm: pixel data in 12-bit JPEG Extended .* no decoder"):
        DICOM.read(tmp_path / "s")


# --------------------------------------------------------------------------- fuzzed headers


def _phantom_series(folder: Path, **kwargs) -> list[Path]:
    volume = np.random.default_rng(0).integers(0, 1000, size=(6, 8, 10)).astype(np.int16)
    return write_series(folder, volume, **kwargs)


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _delete(keyword: str) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def _set(keyword: str, value: object) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def _shift(offset: list[float]) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: setattr(ds, "ImagePositionPatient", list(np.asarray(ds.ImagePositionPatient, float) + offset))


def _fuzz_missing_position(files):
    _edit(files[3], _delete("ImagePositionPatient"))
    return files[3], "no ImagePositionPatient"


def _fuzz_missing_slice(files):
    files[2].unlink()
    return files[3], "from the previous slice, the series' spacing is 2.5 mm"


def _fuzz_uneven_spacing(files):
    _edit(files[4], _shift([0, 0, 0.6]))
    return files[4], "missing or irregularly spaced"


def _fuzz_duplicate_position(files):
    shutil.copy(files[2], files[2].with_name("copy.dcm"))
    _edit(files[2].with_name("copy.dcm"), _set("SOPInstanceUID", f"{ROOT}.99"))
    return None, "same position as"


def _fuzz_truncated_pixels(files):
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 37])
    return files[1], "truncated pixel data"


def _fuzz_lying_rows(files):
    _edit(files[0], _set("Rows", 80))  # the header promises more pixels than the file holds
    return files[0], r"(80x10 pixels, other slices|truncated pixel data)"


def _fuzz_no_decoder(files):
    def htj2k(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # High-Throughput JPEG 2000

    for path in files:
        jp2k = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = jp2k.file_meta.TransferSyntaxUID
        ds.PixelData, ds.Rows, ds.Columns = jp2k.PixelData, jp2k.Rows, jp2k.Columns
        ds["PixelData"].VR = "OB"
        htj2k(ds)
        ds.save_as(path, enforce_file_format=True)
    return None, r"High-Throughput JPEG 2000.*no decoder"


def _fuzz_gantry_tilt(files):
    for k, path in enumerate(files):
        _edit(path, _shift([0.2 * 2.5 * k, 0, 0]))
    return None, "not stacked along the slice normal"


def _fuzz_orientation(files):
    _edit(files[2], _set("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]))
    return files[2], "orientation differs"


def _fuzz_colour(files):
    _edit(files[1], _set("SamplesPerPixel", 3))
    return files[1], "samples per pixel"


def _fuzz_multiframe(files):
    _edit(files[0], _set("NumberOfFrames", 2))
    return files[0], "multi-frame"


def _fuzz_corrupt_header(files):
    files[0].write_bytes(files[0].read_bytes()[: 128 + 4 + 30])
    return files[0], "not a readable DICOM file"


def _fuzz_no_series_uid(files):
    _edit(files[0], _delete("SeriesInstanceUID"))
    return files[0], "no SeriesInstanceUID"


def _fuzz_bad_orientation(files):
    for path in files:
        _edit(path, _set("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]))
    return None, "not two orthogonal unit vectors"


def _fuzz_mixed_series(files):
    _phantom_series(files[0].parent, series=f"{ROOT}.2", prefix="B")
    return None, f"2 DICOM series; choose one with --series UID: {ROOT}.1 .*; {ROOT}.2"


def _fuzz_single_slice(files):
    for path in files[1:]:
        path.unlink()
    return None, "a series of one slice"


FUZZ = [
    _fuzz_missing_position,
    _fuzz_missing_slice,
    _fuzz_uneven_spacing,
    _fuzz_duplicate_position,
    _fuzz_truncated_pixels,
    _fuzz_lying_rows,
    _fuzz_no_decoder,
    _fuzz_gantry_tilt,
    _fuzz_orientation,
    _fuzz_colour,
    _fuzz_multiframe,
    _fuzz_corrupt_header,
    _fuzz_no_series_uid,
    _fuzz_bad_orientation,
    _fuzz_mixed_series,
    _fuzz_single_slice,
]


class _NoCompute:
    """A backend that must never be reached: the input is refused before any compute."""

    name, device, precision = "none", "cpu", "fp32"

    def run(self, inputs, *, probabilities=False):
        raise AssertionError("a refused input reached the model")

    def describe(self):
        return {}

    def volume_ops(self):
        return None


@pytest.mark.parametrize("fuzz", FUZZ, ids=[f.__name__[6:] for f in FUZZ])
def test_fuzzed_series_is_one_error_naming_the_file_and_leaves_nothing(tmp_path, fuzz):
    folder = tmp_path / "series"
    culprit, message = fuzz(_phantom_series(folder))
    named = str(culprit if culprit is not None else folder)
    with pytest.raises(InputError, match=message) as caught:
        DICOM.read(folder)
    text = str(caught.value)
    assert text.startswith(named + ":" if culprit else named) and "\n" not in text, text
    out = tmp_path / "out"
    out.mkdir()
    opts = RunOptions(output_types=("nifti", "dicom-seg"))
    summary = run_files([folder], out, _NoCompute(), PRESETS["demo"], opts)  # type: ignore[arg-type]
    assert [type(exc) for _, exc in summary.failures] == [InputError]
    assert os.listdir(out) == []  # nothing written, no temp file left


def test_series_option_picks_among_several(tmp_path):
    folder = tmp_path / "two"
    _phantom_series(folder)
    wanted = np.full((3, 4, 5), 7, np.int16)
    wanted[0, 0, 0] = 9
    write_series(folder, wanted, series=f"{ROOT}.2", prefix="B")
    volume = DICOM.read(folder, series=f"{ROOT}.2")
    assert volume.array.shape == (5, 4, 3) and volume.array.max() == 9
    with pytest.raises(InputError, match=f"two: no image series 1.2.3; the folder holds {ROOT}.1 \\(MR, 6 files\\)"):
        DICOM.read(folder, series="1.2.3")


def test_non_image_objects_beside_the_series_are_ignored(tmp_path):
    folder = tmp_path / "s"
    _phantom_series(folder)
    shutil.copy(get_testdata_file("rtplan.dcm"), folder / "rt.dcm")
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "sr.dcm")
    (folder / "notes.txt").write_text("not DICOM")
    assert DICOM.read(folder).array.shape == (10, 8, 6)


def test_a_dicom_file_or_an_empty_folder_is_refused(tmp_path):
    files = _phantom_series(tmp_path / "s")
    with pytest.raises(InputError, match="a DICOM file; give the folder"):
        DICOM.read(files[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no DICOM files"):
        DICOM.read(tmp_path / "empty")
    only_rt = tmp_path / "rt"
    only_rt.mkdir()
    shutil.copy(get_testdata_file("rtplan.dcm"), only_rt / "rt.dcm")
    with pytest.raises(InputError, match="no image slices"):
        DICOM.read(only_rt)


def test_voxel_limit_is_checked_before_decoding(tmp_path):
    _phantom_series(tmp_path / "s")
    with pytest.raises(InputError, match="over the limit"):
        DICOM.read(tmp_path / "s", max_voxels=100)


@pytest.mark.shared
def test_a_real_knee_volume_survives_the_trip_through_dicom(tmp_path):
    """A shared knee case written as a DICOM series (160 slices) reads back to the NIfTI's voxels and affine."""
    from ldseg.io.geometry import Geometry
    from ldseg.io.nifti import read_volume
    from tests.helpers import shared_or_skip

    nifti = read_volume(shared_or_skip("knee", "images", "case1.nii.gz"))
    geometry = Geometry.from_affine(nifti.affine)
    write_series(
        tmp_path / "knee",
        nifti.array.transpose(2, 1, 0).astype(np.int16),
        spacing=geometry.spacing,
        origin=geometry.origin,
        direction=geometry.matrix,
        shuffle_seed=1,
    )
    volume = DICOM.read(tmp_path / "knee")
    np.testing.assert_array_equal(volume.array, nifti.array)
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-6)
