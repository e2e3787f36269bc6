"""Voxel-to-world geometry in the two conventions ldseg meets, and exact conversion between them.

ITK/DICOM/NRRD/MetaImage state geometry as spacing, origin and direction cosines in LPS world
coordinates, for the index order (i, j, k) = (column, row, slice). NIfTI states one 4x4 affine in
RAS. ldseg's arrays are in (i, j, k) order in both cases (nibabel order), so the two differ only in
the sign of the first two world axes: affine = diag(-1, -1, 1, 1) @ [[D * spacing, origin], [0, 1]].

A volume read from an ITK format keeps its Geometry as read, so writing it back to that format
copies the numbers verbatim instead of recomputing them from the affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # LPS, mm: world position of voxel (0, 0, 0)
    direction: tuple[float, ...]  # 3x3 row-major; column j is axis j's unit vector (LPS)

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def affine(self) -> np.ndarray:
        """The RAS voxel-to-world affine (nibabel convention) of this geometry."""
        affine = np.eye(4)
        affine[:3, :3] = _LPS_TO_RAS @ self.matrix @ np.diag(self.spacing)
        affine[:3, 3] = _LPS_TO_RAS @ np.asarray(self.origin, dtype=np.float64)
        return affine

    @staticmethod
    def from_affine(affine: np.ndarray) -> Geometry:
        """Spacing = column norms, direction = normalized columns (a sheared affine keeps its
        shear in non-orthogonal direction columns, which NRRD and MetaImage can store)."""
        lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        direction = lps[:, :3] / spacing
        return Geometry(_floats(spacing), _floats(lps[:, 3]), _floats(direction.ravel()))

    @staticmethod
    def from_sitk(image: Any) -> Geometry:
        return Geometry(_floats(image.GetSpacing()), _floats(image.GetOrigin()), _floats(image.GetDirection()))

    def apply_to(self, image: Any) -> None:
        """Set this geometry on a SimpleITK image."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def problem(self) -> str | None:
        """Why this geometry cannot place voxels in the world, or None."""
        values = np.asarray([*self.spacing, *self.origin, *self.direction], dtype=np.float64)
        if not np.all(np.isfinite(values)):
            return "geometry has non-finite spacing, origin or direction"
        if min(self.spacing) <= 0:
            return f"voxel spacing {self.spacing} is not positive"
        if abs(np.linalg.det(self.matrix)) < 1e-6:
            return "direction cosines are degenerate (axes not independent)"
        return None


def _floats(values: Any) -> Any:
    return tuple(float(v) for v in values)
