"""NIfTI volumes in and out. Geometry (affine, header) travels with the array, so an output
label map is written on exactly the input's grid and overlays it in any viewer.

Every problem with an input becomes one InputError line naming the file; nibabel reads data
lazily, so corrupt or truncated payloads only surface when the array is materialized.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from numpy.typing import DTypeLike

from ldseg.errors import InputError, OutputError
from ldseg.io.atomic import atomic_write
from ldseg.io.geometry import Geometry
from ldseg.io.lazy import lazy_module
from ldseg.io.validate import DEFAULT_MAX_VOXELS, as_label_ids, check_intensities, check_shape

if TYPE_CHECKING:
    import nibabel as nib
else:  # 0.2-0.3 s of import (it loads pydicom when installed): paid by the first read, not the first screen
    nib = lazy_module("nibabel")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What nibabel/gzip/zlib/numpy raise on unreadable, truncated or corrupt files."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError, ImageDataError

    return (
        ImageFileError,
        HeaderDataError,
        ImageDataError,
        OSError,
        EOFError,
        zlib.error,
        ValueError,
        OverflowError,  # e.g. a vox_offset of 3e38 does not fit a file offset
    )


_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Volume:
    """A 3D volume in nibabel axis order (X, Y, Z) with the geometry it came with.

    `array` is float32 for images (read_volume) and an unsigned integer type for label maps
    (read_label_volume). `header` already describes the 3D shape (a squeezed 4th axis is gone).
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path
    # Set by the ITK-format readers (NRRD, MetaImage, DICOM): the geometry exactly as the file
    # states it, so writers of those formats copy it rather than recompute it from `affine`.
    geometry: Geometry | None = None
    # DICOM: the series read (its files and headers), for outputs that reference it (SEG).
    source: Any = None

    def itk_geometry(self) -> Geometry:
        return self.geometry if self.geometry is not None else Geometry.from_affine(self.affine)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _has_nifti_suffix(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


_GZIP_MAGIC = b"\x1f\x8b"
_INFLATE_CHUNK = 1 << 22  # compressed bytes read, and inflated bytes dropped, per step


def _inflate(path: Path, needed: int) -> tuple[bytes, int] | None:
    """A gzipped file inflated to its end: its first `needed` bytes and its whole inflated size; None
    for a plain file.

    To the end, so the CRC and length trailer of every member are checked: nibabel stops reading
    once it has the voxels it needs, so a damaged stream that still inflates would otherwise pass
    silently as wrong intensities. The kept bytes are what nibabel then reads the voxels from, so
    the file is inflated once, not twice (half a knee volume's read). Memory: `needed` bytes (the
    header's size, bounded by the voxel limit) plus one chunk, whatever trails them. Members may
    follow each other, with zero padding between them, as gzip allows.
    """
    with path.open("rb") as raw:
        if raw.read(2) != _GZIP_MAGIC:
            return None
        raw.seek(0)
        kept: list[bytes] = []
        size = 0
        member: Any = None  # None between members
        data = b""
        while True:
            if not data:
                data = raw.read(_INFLATE_CHUNK)
                if not data:
                    break
            if member is None:
                data = data.lstrip(b"\0")
                if not data:
                    continue
                member = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
            room = needed - size
            out = member.decompress(data, room if room > 0 else _INFLATE_CHUNK)
            if room > 0:
                kept.append(out)
            size += len(out)
            if member.eof:
                data, member = member.unused_data, None
            else:
                data = member.unconsumed_tail
        if member is not None:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
    return b"".join(kept), size


def _load_header(path: Path, max_voxels: int) -> tuple[nib.Nifti1Image, tuple[int, ...]]:
    """Open `path` lazily and validate everything knowable from the header alone."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a NIfTI file")
    try:
        img = nib.load(path)
    except _read_errors() as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({_one_line(exc)})") from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise InputError(f"{path}: not a NIfTI file (nibabel read it as {type(img).__name__})")

    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":  # complex, RGB(A): no single intensity per voxel
        label = img.header.get_value_label("datatype")
        raise InputError(f"{path}: unsupported data type {label} (scalar voxels are required)")

    shape = check_shape(path, img.shape, max_voxels)
    voxels = math.prod(shape)

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: affine has non-finite entries")
    if np.linalg.matrix_rank(affine[:3, :3]) < 3:
        raise InputError(f"{path}: singular affine (zero voxel size or degenerate axes)")
    # last: the only check that reads the whole file. Comparing sizes before any voxel is read
    # means a short file whose header promises a large volume costs no more memory than it holds.
    # The offset is where nibabel reads the voxels (a single file's vox_offset 0 means after its header).
    offset = int(cast(Any, img.dataobj).offset)
    needed = offset + voxels * dtype.itemsize
    try:
        inflated = _inflate(path, needed)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: truncated or corrupt gzip data ({_one_line(exc)})") from exc
    size = path.stat().st_size if inflated is None else inflated[1]
    if size < needed:
        raise InputError(
            f"{path}: truncated or corrupt image data (the header needs {needed} bytes, the file holds {size})"
        )
    if inflated is not None:  # the voxels are read from the inflated bytes, not inflated again
        try:
            img = type(img).from_bytes(inflated[0])
        except _read_errors() as exc:
            raise InputError(f"{path}: not a readable NIfTI file ({_one_line(exc)})") from exc
    return img, shape


def _read_array(img: nib.Nifti1Image, path: Path, shape: tuple[int, ...], *, labels: bool) -> np.ndarray:
    try:
        if labels:
            array = np.asanyarray(img.dataobj)
        else:
            # Scales straight into float32; get_fdata() would default to float64 (2x memory).
            array = img.get_fdata(dtype=np.float32, caching="unchanged")
    except _read_errors() as exc:
        raise InputError(f"{path}: truncated or corrupt image data ({_one_line(exc)})") from exc
    return np.asarray(array).reshape(shape)


def _volume(img: nib.Nifti1Image, array: np.ndarray, path: Path) -> Volume:
    header = img.header.copy()
    header.set_data_shape(array.shape)
    affine = np.asarray(img.affine, dtype=np.float64)
    return Volume(array=array, affine=affine, header=header, path=path)


def read_volume(path: Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a 3D intensity volume as float32 (X, Y, Z); InputError for anything unusable."""
    path = Path(path)
    img, shape = _load_header(path, max_voxels)
    array = _read_array(img, path, shape, labels=False).astype(np.float32, copy=False)
    check_intensities(path, array)
    return _volume(img, array, path)


def read_label_volume(path: Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a 3D label map (non-negative integers) as uint8, or uint16/uint32 if ids need it."""
    path = Path(path)
    img, shape = _load_header(path, max_voxels)
    raw = _read_array(img, path, shape, labels=True)
    return _volume(img, as_label_ids(path, raw), path)


def write_volume(
    path: Path,
    array: np.ndarray,
    reference: Volume,
    *,
    overwrite: bool,
    dtype: DTypeLike = np.uint8,
    description: str | None = None,
) -> None:
    """Write `array` (nibabel order, reference's shape) on the reference's grid, atomically.

    The header is the reference's (same qform/sform and codes, so the output overlays the input)
    with the data type set to `dtype` and no intensity scaling, so labels are stored verbatim.
    `description` (<= 80 bytes) goes into the header's descrip field, e.g. the precision it ran at.
    """
    path = Path(path)
    if not _has_nifti_suffix(path):
        raise OutputError(f"{path}: output name must end in .nii or .nii.gz")
    array = np.asarray(array)
    if array.shape != reference.array.shape:
        raise ValueError(f"array shape {array.shape} != reference shape {reference.array.shape}")
    out_dtype = np.dtype(dtype)
    if out_dtype.kind in "iu" and array.size:
        info = np.iinfo(out_dtype)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"values outside the range of {out_dtype}")
    data = array.astype(out_dtype, copy=False)

    header = reference.header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(out_dtype)
    header.set_slope_inter(None, None)  # raw values on disk: labels must not be rescaled
    header["cal_min"], header["cal_max"] = 0, 0  # the input's display window means nothing here
    if description is not None:
        header["descrip"] = description.encode()[:80]
    # Same header affine => nibabel keeps qform/sform untouched (it only rewrites on mismatch).
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(data, reference.affine, header=header)

    def write(tmp: Path) -> None:
        nib.save(img, tmp)

    atomic_write(path, write, overwrite)
