"""NIfTI (.nii, .nii.gz) through nibabel: the reader and writer ldseg has always had."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from ldseg.io import nifti
from ldseg.io.nifti import Volume
from ldseg.io.validate import DEFAULT_MAX_VOXELS


class NiftiFormat:
    name: str = "nifti"
    suffixes: tuple[str, ...] = (".nii", ".nii.gz")
    write_suffix: str = ".nii.gz"

    def read(
        self, path: Path, *, labels: bool = False, series: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
    ) -> Volume:
        reader = nifti.read_label_volume if labels else nifti.read_volume
        return reader(path, max_voxels=max_voxels)

    def write(self, path: Path, array: np.ndarray, reference: Volume, *, overwrite: bool, dtype: DTypeLike,
              description: str | None = None) -> None:  # fmt: skip
        nifti.write_volume(path, array, reference, overwrite=overwrite, dtype=dtype, description=description)
