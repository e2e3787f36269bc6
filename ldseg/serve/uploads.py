"""What a request body becomes on disk: one input file, or the folder of one DICOM series.

The body is streamed into the request's temporary folder and counted while it arrives, so a body
over --max-upload-mb is refused (413) without holding it in memory. Its format is the `format`
query parameter, else read from its first bytes. A zip (one DICOM series) is extracted member by
member with every path checked to stay inside its folder, no links, and bounded file count and
total size, counted on the bytes actually written (a zip's own sizes can lie).
"""

from __future__ import annotations

import re
import stat
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ldseg.errors import InputError
from ldseg.io.formats import is_dicom_file
from ldseg.serve.errors import HttpProblem

# `format` values: the suffix the upload is saved under (ldseg.io.formats picks the reader by it).
FORMATS = {
    "nii": ".nii",
    "nii.gz": ".nii.gz",
    "nifti": "",  # .nii or .nii.gz, from the gzip magic
    "nrrd": ".nrrd",
    "mha": ".mha",
    "zip": ".zip",
    "dicom": ".zip",
}
MAX_ZIP_FILES = 10_000  # slices of one series; a knee MR has ~160, a thin-slice CT ~2000
ZIP_EXPANSION = 4  # a zip may expand to this many times --max-upload-mb
_CHUNK = 1 << 20
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Upload:
    """The input ldseg reads (a file, or a DICOM series folder) and the name outputs are named after."""

    path: Path
    stem: str


def safe_name(name: str | None, default: str = "upload") -> str:
    """A client-given file name as one harmless path component (outputs are named after it)."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = _NAME.sub("_", base).strip("._")
    return base[:100] or default


async def receive(chunks: AsyncIterator[bytes], target: Path, limit: int) -> int:
    """Stream a body into `target`; 413 as soon as it passes `limit` bytes."""
    size = 0
    with target.open("wb") as handle:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise HttpProblem(413, f"body over the upload limit of {limit // (1 << 20)} MB", "too_large")
            handle.write(chunk)
    if size == 0:
        raise HttpProblem(400, "empty body: send one input file (NIfTI, NRRD, MHA, or a zip of one DICOM series)")
    return size


def sniff(path: Path) -> str:
    """The upload's suffix from its first bytes (the `format` values' suffixes)."""
    with path.open("rb") as handle:
        head = handle.read(352)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return ".zip"
    if head.startswith(b"\x1f\x8b"):
        return ".nii.gz"  # gzip: ldseg reads gzip only as NIfTI
    if head.startswith(b"NRRD"):
        return ".nrrd"
    if head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] == b"n+2\0":
        return ".nii"
    if b"ObjectType" in head[:200] or b"NDims" in head[:200]:
        return ".mha"
    raise HttpProblem(
        415,
        "unknown upload format: send NIfTI (.nii/.nii.gz), NRRD, MetaImage (.mha) or a zip of one DICOM series, "
        "or say which with ?format=nii.gz|nii|nrrd|mha|zip",
        "format",
    )


def suffix_for(body: Path, fmt: str | None) -> str:
    if fmt is None:
        return sniff(body)
    if fmt not in FORMATS:
        raise HttpProblem(400, f"format={fmt}: choose from {', '.join(FORMATS)}", "options")
    suffix = FORMATS[fmt]
    if suffix == "":
        with body.open("rb") as handle:
            suffix = ".nii.gz" if handle.read(2) == b"\x1f\x8b" else ".nii"
    return suffix


def materialize(body: Path, folder: Path, name: str | None, fmt: str | None, max_total: int) -> Upload:
    """The body as the input ldseg reads: renamed to its format's suffix, or a zip extracted."""
    suffix = suffix_for(body, fmt)
    stem = safe_name(name)
    for known in (".nii.gz", ".nii", ".nrrd", ".mha", ".zip"):
        if stem.lower().endswith(known):
            stem = stem[: -len(known)] or "upload"
            break
    if suffix != ".zip":
        path = folder / f"{stem}{suffix}"
        body.rename(path)
        return Upload(path, stem)
    series = folder / stem
    extract_zip(body, series, max_total)
    body.unlink()
    return Upload(series_folder(series), stem)


def _member_path(root: Path, info: zipfile.ZipInfo) -> Path:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise InputError(f"zip member {info.filename!r} points outside the zip's folder; refused")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InputError(f"zip member {info.filename!r} is a symbolic link; refused")
    target = (root / PurePosixPath(*parts)).resolve() if parts else root
    if root.resolve() not in (target, *target.parents):
        raise InputError(f"zip member {info.filename!r} points outside the zip's folder; refused")
    return target


def extract_zip(archive: Path, root: Path, max_total: int) -> None:
    """Extract safely (see the module docstring); InputError for a bad zip, 413 for one too big."""
    root.mkdir()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_FILES:
                raise HttpProblem(413, f"zip holds {len(members)} files, more than {MAX_ZIP_FILES}", "too_large")
            total = 0
            for info in members:
                target = _member_path(root, info)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    while chunk := src.read(_CHUNK):
                        total += len(chunk)
                        if total > max_total:
                            raise HttpProblem(
                                413, f"zip expands to more than {max_total // (1 << 20)} MB; refused", "too_large"
                            )
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise InputError(f"{archive.name}: not a readable zip ({' '.join(str(exc).split())})") from exc


def series_folder(root: Path) -> Path:
    """The one folder of the extracted zip that holds DICOM files (a zip of a folder nests it)."""
    holding = sorted({p.parent for p in root.rglob("*") if p.is_file() and is_dicom_file(p)})
    if not holding:
        raise InputError(f"{root.name}: the zip holds no DICOM files")
    if len(holding) > 1:
        names = ", ".join(str(p.relative_to(root.parent)) for p in holding[:5])
        raise InputError(f"{root.name}: DICOM files in {len(holding)} folders ({names}); send one series per request")
    return holding[0]
