"""Pre- and post-processing where the model runs (issue 30): what a backend offers, if anything.

The CPU path (ldseg.io.preprocess: min-max, scipy's zoom, the class maps zoomed back and argmaxed)
is the reference and stays as it is. A GPU backend may offer the same three operations on its device
(`Backend.volume_ops()`); the run path then hands it the volume as read instead of resampling on the
host. Each operation computes what its reference computes, in float64 like scipy's interpolation:
- `to_model_grid`: ldseg.io.preprocess.image_to_model_grid (3D volumes);
- `labels_on_input_grid`: ldseg.io.preprocess.probabilities_to_input_grid;
- `map_on_input_grid`: a float map zoomed back (ldseg.runs.volumes.map_to_input_grid, 3D).
Arrays come and go in the reference's axis orders: nibabel (X, Y, Z) on the input side, (D, H, W)
on the model grid.

An operation that runs out of the device's memory (a large CT beside the model on a small GPU) raises
DeviceMemoryError, whatever its library said; the run path then does that volume's step on the CPU
path instead (ldseg.runs.volumes), so the volume is still segmented, identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class DeviceMemoryError(RuntimeError):
    """A volume operation ran out of its device's memory (the message names the device)."""

    @classmethod
    def of(cls, where: str, exc: BaseException) -> DeviceMemoryError:
        """`where: out of memory (<the library's first line>)`."""
        text = str(exc).strip()
        return cls(f"{where}: out of memory ({text.splitlines()[0] if text else type(exc).__name__})")


class VolumeOps(Protocol):
    where: str  # the device, for records ("cuda:0")

    def to_model_grid(self, array_nib: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        """(X, Y, Z) volume as read, any dtype -> (D, H, W) float32 in [0, 1]; ValueError for a
        constant or NaN volume, in the reference's words."""
        ...

    def labels_on_input_grid(self, probabilities: np.ndarray, input_shape_nib: Sequence[int]) -> np.ndarray:
        """(C, D, H, W) probabilities on the model grid -> uint8 labels (X, Y, Z) on the input grid."""
        ...

    def map_on_input_grid(self, values: np.ndarray, input_shape_nib: Sequence[int]) -> np.ndarray:
        """(D, H, W) float map on the model grid -> float32 (X, Y, Z) on the input grid."""
        ...
