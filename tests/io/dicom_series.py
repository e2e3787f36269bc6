"""Test helper: write a volume as a DICOM series with SimpleITK (GDCM), as a scanner export would.

Each slice is its own file with the tags a reader needs; the caller controls the geometry
(oblique, anisotropic) and the file order (names shuffled so reading by name is wrong).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's UID root, for made-up test UIDs


def oblique_direction(a: float = 0.3, b: float = 0.2) -> np.ndarray:
    """A proper rotation: about z by a, then about x by b (columns = axis directions)."""
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def write_series(
    folder: Path,
    volume_kji: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (0.7, 0.9, 2.5),
    origin: tuple[float, float, float] = (10.1, -3.3, 7.7),
    direction: np.ndarray | None = None,
    series: str = f"{ROOT}.1",
    shuffle_seed: int | None = 0,
    prefix: str = "IM",
) -> list[Path]:
    """Write `volume_kji` (ITK order: slices, rows, columns; int16) as one file per slice.

    Returns the files in slice order (k). File names are a random permutation of the slice
    order when `shuffle_seed` is given, so only positions tell the true order."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = oblique_direction() if direction is None else direction
    image = sitk.GetImageFromArray(np.asarray(volume_kji, dtype=np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction, dtype=np.float64).ravel()))
    depth = image.GetDepth()
    order = np.random.default_rng(shuffle_seed).permutation(depth) if shuffle_seed is not None else np.arange(depth)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.12g}" for v in (*direction[:, 0], *direction[:, 1]))
    files = []
    for k in range(depth):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": MR_IMAGE_STORAGE,
            "0008|0018": f"{series}.{k + 1}",
            "0008|0060": "MR",
            "0010|0010": "Phantom^Test",
            "0010|0020": "PHANTOM",
            "0020|000d": f"{ROOT}.9",
            "0020|000e": series,
            "0020|0052": f"{ROOT}.8",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.12g}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{spacing[2]:.12g}",
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        path = folder / f"{prefix}{order[k]:04d}.dcm"
        writer.SetFileName(str(path))
        writer.SetImageIO("GDCMImageIO")
        writer.Execute(plane)
        files.append(path)
    return files
