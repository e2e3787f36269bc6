"""Volume formats behind one interface (VolumeFormat), and the one place that picks a format.

| format | reads | writes |
| --- | --- | --- |
| nifti | .nii, .nii.gz (nibabel) | .nii.gz |
| nrrd | .nrrd, .nhdr (SimpleITK) | .nrrd |
| mha | .mha, .mhd (SimpleITK) | .mha |
| dicom | a folder of DICOM slices (pydicom headers, SimpleITK voxels) | DICOM SEG only (dicom_seg) |
"""

from __future__ import annotations

from pathlib import Path

from ldseg.choices import OUTPUT_TYPES
from ldseg.errors import InputError

from .base import VolumeFormat
from .dicom import DICOM, dicom_files, is_dicom_file
from .itk import METAIMAGE, NRRD
from .nifti import NiftiFormat

NIFTI = NiftiFormat()
FILE_FORMATS: tuple[VolumeFormat, ...] = (NIFTI, NRRD, METAIMAGE)
WRITERS: dict[str, VolumeFormat] = {"nifti": NIFTI, "nrrd": NRRD, "mha": METAIMAGE}
EXTENSIONS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".dcm"}
VOLUME_SUFFIXES = tuple(s for f in FILE_FORMATS for s in f.suffixes)


def _sniff(path: Path) -> VolumeFormat | None:
    """The format of a file whose name does not say it, from its first bytes."""
    try:
        with path.open("rb") as handle:
            head = handle.read(352)
    except OSError:
        return None
    if head.startswith(b"NRRD"):
        return NRRD
    if head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] == b"n+2\0":
        return NIFTI
    if head[128:132] == b"DICM":
        return DICOM
    return None


def format_of(path: Path) -> VolumeFormat:
    """By extension, else by content; a folder is a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return DICOM
    name = path.name.lower()
    for fmt in FILE_FORMATS:
        if name.endswith(fmt.suffixes):
            return fmt
    found = _sniff(path) if path.is_file() else None
    if found is None:
        raise InputError(
            f"{path}: not a volume ldseg reads (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, or a folder of DICOM files)"
        )
    return found


def holds_dicom(folder: Path) -> bool:
    return any(is_dicom_file(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


__all__ = [
    "DICOM",
    "EXTENSIONS",
    "FILE_FORMATS",
    "METAIMAGE",
    "NIFTI",
    "NRRD",
    "OUTPUT_TYPES",
    "VOLUME_SUFFIXES",
    "WRITERS",
    "VolumeFormat",
    "dicom_files",
    "format_of",
    "holds_dicom",
    "is_dicom_file",
]
