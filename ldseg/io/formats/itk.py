"""NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) through SimpleITK, geometry kept exactly.

The header is read and validated (dimension, voxel type, size limit, geometry) before any voxel
is; ITK's own errors on a short or corrupt payload become one line naming the file. Outputs are
single files (.nrrd / .mha, gzip-compressed): a detached header and its data file could not be
renamed into place together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import DTypeLike

from ldseg.errors import InputError, OutputError
from ldseg.io.atomic import atomic_write
from ldseg.io.geometry import Geometry
from ldseg.io.lazy import lazy_module
from ldseg.io.nifti import Volume
from ldseg.io.validate import DEFAULT_MAX_VOXELS, as_label_ids, check_intensities, check_shape, one_line

from .base import check_write_shape

if TYPE_CHECKING:
    import nibabel as nib
    import SimpleITK as sitk
else:
    nib = lazy_module("nibabel")
    sitk = lazy_module("SimpleITK")

_COMPLEX = ("sitkComplexFloat32", "sitkComplexFloat64")  # pixel ids by name: SimpleITK loads on first use


def itk_message(exc: BaseException) -> str:
    """The reason in an ITK exception, without the source file/line and object-address noise."""
    text = one_line(exc)
    for marker in ("ITK ERROR:", "itk::ERROR:", "sitk::ERROR:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    text = re.sub(r"^\s*\w+\(0x[0-9a-f]+\):\s*", "", text)
    if "[nrrd]" in text:  # teem nests its reasons; the innermost, last, is the one that says what is wrong
        text = text.rsplit("[nrrd]", 1)[1]
    return text.strip()[:300] or type(exc).__name__


def nifti_header(affine: np.ndarray, shape: tuple[int, ...]) -> nib.Nifti1Header:
    """A NIfTI header stating `affine` (sform and qform), for writing a NIfTI on this grid."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)  # nibabel strips shear here; the sform keeps it
    return header


def volume_from_sitk(image: Any, path: Path, *, labels: bool, source: Any = None) -> Volume:
    """A validated Volume ((i, j, k) array + geometry) from a 3D SimpleITK image."""
    geometry = Geometry.from_sitk(image)
    problem = geometry.problem()
    if problem is not None:
        raise InputError(f"{path}: {problem}")
    raw = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # ITK (k, j, i) -> (i, j, k)
    if labels:
        array = as_label_ids(path, raw)
    else:
        array = np.array(raw, dtype=np.float32)
        check_intensities(path, array)
    affine = geometry.affine()
    return Volume(array, affine, nifti_header(affine, array.shape), path, geometry, source)


class ItkFormat:
    """One SimpleITK ImageIO: NRRD or MetaImage."""

    def __init__(self, name: str, image_io: str, suffixes: tuple[str, ...], write_suffix: str) -> None:
        self.name = name
        self.image_io = image_io
        self.suffixes = suffixes
        self.write_suffix = write_suffix

    def read(
        self, path: Path, *, labels: bool = False, series: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
    ) -> Volume:
        path = _existing_file(Path(path), self.name)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.SetImageIO(self.image_io)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"{path}: not a readable {self.name.upper()} file ({itk_message(exc)})") from exc
        if reader.GetNumberOfComponents() != 1 or reader.GetPixelID() in {getattr(sitk, name) for name in _COMPLEX}:
            raise InputError(
                f"{path}: {reader.GetNumberOfComponents()}-component or complex voxels (scalar voxels are required)"
            )
        check_shape(path, reader.GetSize(), max_voxels)  # before any voxel is read
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"{path}: truncated, corrupt or inconsistent file ({itk_message(exc)})") from exc
        if image.GetDimension() > 3:  # a trailing axis of one frame (check_shape allowed only that)
            image = image[(slice(None),) * 3 + (0,) * (image.GetDimension() - 3)]
        return volume_from_sitk(image, path, labels=labels)

    def write(self, path: Path, array: np.ndarray, reference: Volume, *, overwrite: bool, dtype: DTypeLike,
              description: str | None = None) -> None:  # fmt: skip
        path = Path(path)
        if not path.name.lower().endswith(self.write_suffix):
            raise OutputError(f"{path}: output name must end in {self.write_suffix}")
        array = np.asarray(array)
        check_write_shape(array, reference)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype, copy=False).transpose(2, 1, 0)))
        reference.itk_geometry().apply_to(image)
        if description is not None:
            image.SetMetaData("ldseg", description)  # a header key in NRRD and MetaImage

        def write(tmp: Path) -> None:
            try:
                sitk.WriteImage(image, str(tmp), useCompression=True)
            except RuntimeError as exc:  # ITK does not say which errno; the reason is in its text
                raise OutputError(f"{path}: cannot write ({itk_message(exc)})") from exc

        atomic_write(path, write, overwrite)


NRRD = ItkFormat("nrrd", "NrrdImageIO", (".nrrd", ".nhdr"), ".nrrd")
METAIMAGE = ItkFormat("mha", "MetaImageIO", (".mha", ".mhd"), ".mha")


def _existing_file(path: Path, name: str) -> Path:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a {name.upper()} file")
    return path
