"""The one interface each volume format implements (as nnU-Net's imageio/ readers/writers do).

A format reads a path into a `Volume` (array in (i, j, k) order + geometry, validated the same way
for every format) and, if it can, writes a map on a reference volume's grid, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import DTypeLike

from ldseg.io.nifti import Volume
from ldseg.io.validate import DEFAULT_MAX_VOXELS


class VolumeFormat(Protocol):
    name: str  # "nifti", "nrrd", "mha", "dicom"
    suffixes: tuple[str, ...]  # lower-case file name endings it reads; () for a folder format
    write_suffix: str  # ending of the files it writes; "": cannot write maps

    def read(
        self, path: Path, *, labels: bool = False, series: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
    ) -> Volume:
        """Intensities as float32 (labels=False) or label ids as unsigned ints; InputError naming the
        file for anything unusable. `series` picks a DICOM series (ignored by file formats)."""
        ...

    def write(self, path: Path, array: np.ndarray, reference: Volume, *, overwrite: bool, dtype: DTypeLike,
              description: str | None = None) -> None:  # fmt: skip
        """Write `array` ((i, j, k), reference's shape) on the reference's grid, atomically; `description`
        (what produced it, e.g. a reduced precision) goes into the header."""
        ...


def check_write_shape(array: np.ndarray, reference: Volume) -> None:
    if array.shape != reference.array.shape:
        raise ValueError(f"array shape {array.shape} != reference shape {reference.array.shape}")
