"""DICOM series in: pydicom reads and checks every header, SimpleITK (GDCM) reads the voxels.

A folder is one input. Its DICOM files are grouped by SeriesInstanceUID; one image series is
picked (the only one, or `--series UID`), its slices sorted along the slice normal, and the
headers checked before any pixel is decoded: every slice has a position, one orientation, one
grid and spacing, slices are evenly spaced and stacked along the normal (no gantry tilt), the
pixel data is all there and in a transfer syntax SimpleITK's GDCM decodes correctly. GDCM is
lenient where it should not be (it invents an origin for a slice without ImagePositionPatient,
reads irregular spacing as regular, and returns garbage for 12-bit lossy JPEG after printing a
warning), so each of those is refused here, naming the file. SimpleITK's geometry is then
cross-checked against the headers.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import DTypeLike

from ldseg.errors import InputError, OutputError
from ldseg.io.geometry import Geometry
from ldseg.io.lazy import lazy_module
from ldseg.io.nifti import Volume
from ldseg.io.validate import DEFAULT_MAX_VOXELS, check_shape, one_line

from .itk import itk_message, volume_from_sitk

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk
    from pydicom.dataset import Dataset
else:
    pydicom = lazy_module("pydicom")
    sitk = lazy_module("SimpleITK")

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_NOT_IMAGES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG"})
# Transfer syntaxes SimpleITK's GDCM decodes correctly (checked on pydicom's test files).
_DECODABLE = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended: 8-bit only (12-bit decodes to garbage, see _check_slice)
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
    }
)
_UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
# What pydicom raises on files that start as DICOM but break off or hold nonsense.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, struct.error, NotImplementedError)
_GAP_TOLERANCE = 0.01  # relative: slice gaps within 1 % of the median count as even
_TILT_TOLERANCE = 0.02  # in-plane drift per mm along the normal (about 1.1 degrees of gantry tilt)


@dataclass(frozen=True)
class DicomSeries:
    """The series a volume was read from: files and headers (no pixel data) in slice order (k), and
    the geometry ldseg checked: `pixel_spacing` (row, column) from PixelSpacing, `slice_spacing`
    from the slices' positions (never SliceThickness, which is Type 2 in the MR IOD: often empty,
    or stripped by anonymizers). `frame_of_reference` is "" when the slices name none."""

    uid: str
    files: tuple[Path, ...]
    datasets: tuple[Dataset, ...]
    pixel_spacing: tuple[float, float] = (1.0, 1.0)
    slice_spacing: float = 1.0
    frame_of_reference: str = ""


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".") and is_dicom_file(p)]


def _read_header(path: Path) -> Dataset:
    try:
        # defer_size: large values (the pixel data) are noted with their length, not loaded
        ds = pydicom.dcmread(path, defer_size=1024)
    except pydicom.errors.InvalidDicomError as exc:
        raise InputError(f"{path}: not a DICOM file ({one_line(exc)})") from exc
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: not a readable DICOM file ({one_line(exc)})") from exc
    if "SOPClassUID" not in ds:  # every DICOM object has one; pydicom returns what a cut-off file held
        raise InputError(f"{path}: not a readable DICOM file (no SOPClassUID: truncated, or not a DICOM object)")
    return ds


def _is_image(ds: Dataset) -> bool:
    return (
        "Rows" in ds
        and "Columns" in ds
        and ds.get("Modality", "") not in _NOT_IMAGES
        and ds.get("SOPClassUID", "") != SEGMENTATION_STORAGE
    )


def _describe(uid: str, members: Sequence[tuple[Path, Dataset]]) -> str:
    ds = members[0][1]
    what = " ".join(str(v) for v in (ds.get("Modality", ""), ds.get("SeriesDescription", "")) if v)
    return f"{uid} ({what + ', ' if what else ''}{len(members)} file{'s' if len(members) > 1 else ''})"


def _pick_series(folder: Path, series: str | None) -> tuple[str, list[tuple[Path, Dataset]]]:
    files = dicom_files(folder)
    if not files:
        raise InputError(f"{folder}: no DICOM files in this folder")
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in files:
        ds = _read_header(path)
        if not _is_image(ds):
            continue  # SEG, RT, SR objects beside the images: not part of an image series
        uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if not uid:
            raise InputError(f"{path}: no SeriesInstanceUID; cannot tell which series the slice belongs to")
        groups.setdefault(uid, []).append((path, ds))
    if not groups:
        raise InputError(f"{folder}: {len(files)} DICOM file(s) but no image slices (only SEG/RT/SR objects)")
    listing = "; ".join(_describe(uid, members) for uid, members in sorted(groups.items()))
    if series is not None:
        if series not in groups:
            raise InputError(f"{folder}: no image series {series}; the folder holds {listing}")
        return series, groups[series]
    if len(groups) > 1:
        raise InputError(f"{folder}: {len(groups)} DICOM series; choose one with --series UID: {listing}")
    uid = next(iter(groups))
    return uid, groups[uid]


def _floats(path: Path, ds: Dataset, keyword: str, count: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or value == "":
        raise InputError(f"{path}: no {keyword}; the slice cannot be placed in space")
    try:
        numbers = np.asarray([float(v) for v in (value if isinstance(value, Sequence) else [value])])
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: {keyword} {value!r} is not {count} numbers") from exc
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise InputError(f"{path}: {keyword} {numbers.tolist()} is not {count} finite numbers")
    return numbers


def _check_slice(path: Path, ds: Dataset) -> None:
    """Everything about one slice that can be known without decoding it."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; give single-slice files")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{path}: {ds.SamplesPerPixel} samples per pixel (colour); a grayscale series is required")
    syntax = pydicom.uid.UID(str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
    bits_stored = int(ds.get("BitsStored", 8))
    if syntax not in _DECODABLE or (syntax == "1.2.840.10008.1.2.4.51" and bits_stored > 8):
        depth = f"{bits_stored}-bit " if syntax == "1.2.840.10008.1.2.4.51" else ""
        raise InputError(f"{path}: pixel data in {depth}{syntax.name} ({syntax}), which no decoder here reads")
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    if element is None:
        raise InputError(f"{path}: no pixel data")
    if str(syntax) in _UNCOMPRESSED:
        needed = int(ds.Rows) * int(ds.Columns) * int(ds.get("BitsAllocated", 16)) // 8
        length = getattr(element, "length", None)
        if element.value is not None:  # read already (small): what the file really held
            length = available = len(element.value)
        else:  # deferred: the header's length, and what the file still holds from where the value starts
            available = path.stat().st_size - getattr(element, "value_tell", 0)
        if length is None or length == 0xFFFFFFFF:
            length = available
        if min(length, available) < needed:
            raise InputError(
                f"{path}: truncated pixel data ({min(length, available)} bytes, "
                f"{ds.Rows}x{ds.Columns} at {ds.get('BitsAllocated')} bits needs {needed})"
            )


def _sorted_slices(folder: Path, members: list[tuple[Path, Dataset]]) -> tuple[list[tuple[Path, Dataset]], float]:
    """Slices in order along the normal, checked to form one regular grid; returns them and the gap."""
    first_path, first = members[0]
    orientation = _floats(first_path, first, "ImageOrientationPatient", 6)
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InputError(
            f"{first_path}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors"
        )
    normal = np.cross(row, col)
    grid = (int(first.Rows), int(first.Columns))
    spacing = _floats(first_path, first, "PixelSpacing", 2)
    if np.any(spacing <= 0):
        raise InputError(f"{first_path}: PixelSpacing {list(spacing)} is not positive")
    placed = []
    for path, ds in members:
        _check_slice(path, ds)
        if not np.allclose(_floats(path, ds, "ImageOrientationPatient", 6), orientation, atol=1e-4):
            raise InputError(f"{path}: orientation differs from {first_path.name}'s (mixed orientations in one series)")
        if (int(ds.Rows), int(ds.Columns)) != grid:
            raise InputError(f"{path}: {ds.Rows}x{ds.Columns} pixels, other slices are {grid[0]}x{grid[1]}")
        if not np.allclose(_floats(path, ds, "PixelSpacing", 2), spacing, rtol=1e-4):
            raise InputError(f"{path}: PixelSpacing differs from {first_path.name}'s")
        position = _floats(path, ds, "ImagePositionPatient", 3)
        placed.append((float(position @ normal), position, path, ds))
    if len(placed) < 2:
        raise InputError(f"{folder}: a series of one slice; a 3D volume needs at least 2")
    placed.sort(key=lambda item: item[0])
    depth = np.asarray([p[0] for p in placed])
    gaps = np.diff(depth)
    for gap, (_, _, path, _), (_, _, previous, _) in zip(gaps, placed[1:], placed[:-1]):
        if gap < 1e-3:
            raise InputError(f"{path}: same position as {previous.name} (duplicate slice, or two acquisitions)")
    median = float(np.median(gaps))
    for gap, (_, _, path, _) in zip(gaps, placed[1:]):
        if abs(gap - median) > _GAP_TOLERANCE * median + 1e-4:
            raise InputError(
                f"{path}: {gap:.4g} mm from the previous slice, the series' spacing is {median:.4g} mm "
                "(missing or irregularly spaced slices)"
            )
    origin = placed[0][1]
    for along, position, path, _ in placed[1:]:
        drift = np.linalg.norm((position - origin) - (along - depth[0]) * normal)
        if drift > _TILT_TOLERANCE * (along - depth[0]) + 1e-3:
            raise InputError(f"{path}: slices are not stacked along the slice normal (gantry tilt or shear)")
    return [(path, ds) for _, _, path, ds in placed], median


def _execute(folder: Path, files: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        for path in files:  # name the slice that fails, if one does on its own
            try:
                sitk.ReadImage(str(path))
            except RuntimeError as single:
                raise InputError(f"{path}: pixel data cannot be decoded ({itk_message(single)})") from exc
        raise InputError(f"{folder}: the series cannot be read ({itk_message(exc)})") from exc


def _cross_check(folder: Path, image: sitk.Image, slices: list[tuple[Path, Dataset]], gap: float) -> None:
    """SimpleITK's geometry must be the headers' (a lying header or a GDCM surprise shows here)."""
    first_path, first = slices[0]
    geometry = Geometry.from_sitk(image)
    expected_size = (int(first.Columns), int(first.Rows), len(slices))
    if tuple(image.GetSize()) != expected_size:
        raise InputError(f"{folder}: SimpleITK read size {image.GetSize()}, the headers say {expected_size}")
    orientation = _floats(first_path, first, "ImageOrientationPatient", 6)
    spacing = _floats(first_path, first, "PixelSpacing", 2)  # (row spacing, column spacing)
    checks: list[tuple[str, Any, Any, float]] = [
        ("origin", geometry.origin, _floats(first_path, first, "ImagePositionPatient", 3), 1e-3),
        ("row direction", geometry.matrix[:, 0], orientation[:3], 1e-4),
        ("column direction", geometry.matrix[:, 1], orientation[3:], 1e-4),
        ("in-plane spacing", geometry.spacing[:2], spacing[::-1], 1e-4 * float(spacing.max())),
        ("slice spacing", geometry.spacing[2], gap, _GAP_TOLERANCE * gap),
    ]
    for what, got, want, tolerance in checks:
        if not np.allclose(got, want, rtol=0, atol=tolerance):
            raise InputError(
                f"{folder}: SimpleITK's {what} {np.round(np.asarray(got), 6).tolist()} disagrees "
                f"with the headers' {np.round(np.asarray(want), 6).tolist()}"
            )


def _frame_of_reference(slices: list[tuple[Path, Dataset]]) -> str:
    """The one FrameOfReferenceUID of the series ("" if its slices name none); InputError if they
    name several (positions in different frames cannot be stacked into one volume)."""
    uids = {str(ds.get("FrameOfReferenceUID", "") or "").strip() for _, ds in slices}
    if len(uids) > 1:
        raise InputError(
            f"{slices[0][0].parent}: slices in {len(uids)} frames of reference ({', '.join(sorted(uids))}); "
            "one series must share one FrameOfReferenceUID"
        )
    return uids.pop()


class DicomFormat:
    """A folder holding DICOM slices. Reads only: segmentations go out as DICOM SEG (dicom_seg)."""

    name: str = "dicom"
    suffixes: tuple[str, ...] = ()
    write_suffix: str = ""

    def read(
        self, path: Path, *, labels: bool = False, series: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
    ) -> Volume:
        folder = Path(path)
        if not folder.is_dir():
            raise InputError(f"{folder}: a DICOM file; give the folder that holds its series")
        uid, members = _pick_series(folder, series)
        _check_slice(*members[0])
        check_shape(folder, (int(members[0][1].Columns), int(members[0][1].Rows), len(members)), max_voxels)
        slices, gap = _sorted_slices(folder, members)
        image = _execute(folder, [p for p, _ in slices])
        _cross_check(folder, image, slices, gap)
        spacing = _floats(*slices[0], "PixelSpacing", 2)
        source = DicomSeries(
            uid,
            tuple(p for p, _ in slices),
            tuple(ds for _, ds in slices),
            (float(spacing[0]), float(spacing[1])),
            gap,
            _frame_of_reference(slices),
        )
        return volume_from_sitk(image, folder, labels=labels, source=source)

    def write(self, path: Path, array: np.ndarray, reference: Volume, *, overwrite: bool, dtype: DTypeLike,
              description: str | None = None) -> None:  # fmt: skip
        raise OutputError(f"{path}: ldseg writes DICOM only as a segmentation (--output-type dicom-seg)")


DICOM = DicomFormat()
