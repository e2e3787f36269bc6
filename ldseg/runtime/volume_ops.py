"""Pre- and post-processing where the model runs (issue 30): what a backend offers, if anything.

The CPU path (ldseg.io.preprocess: min-max, scipy's zoom, the class maps zoomed back and argmaxed)
is the reference and stays as it is. A GPU backend may offer the same three operations on its device
(`Backend.volume_ops()`); the run path then hands it the volume as read instead of resampling on the
host. Each operation computes what its reference computes, in float64 like scipy's interpolation:
- `to_model_grid`: ldseg.io.preprocess.image_to_model_grid (3D volumes);
- `labels_on_input_grid`: ldseg.io.preprocess.probabilities_to_input_grid;
- `map_on_input_grid`: a float map zoomed back (ldseg.runs.volumes.map_to_input_grid, 3D).
Arrays come and go in the reference's axis orders: nibabel (X, Y, Z) on the input side, (D, H, W)
on the model grid. The graphs that ONNX Runtime and TensorRT run are ldseg/runtime/volume_graphs.py;
`axis_feeds` is their per-axis interpolation table.

An operation that runs out of the device's memory (a large CT beside the model on a small GPU) raises
DeviceMemoryError, whatever its library said, and one the device cannot take at all (a volume larger
than TensorRT's engines were built for) DeviceStepUnavailable; the run path then does that volume's
step on the CPU path instead (ldseg.runs.volumes), so the volume is still segmented, identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ldseg.io.preprocess import zoom_coordinates
from ldseg.runtime.samples import ModelGridArray


@dataclass(frozen=True)
class Arithmetic:
    """The types a backend's volume graphs compute in (numpy names; volume_graphs.py builds the graphs
    in them). Here, not there, so a runtime that only feeds the graphs never imports onnx."""

    weight_dtype: str  # the blend's type
    index_dtype: str  # the gather indices' type
    klass_dtype: str  # the running class index's type
    labels_output: bool  # class_step also writes the index as uint8 `labels`


EXACT = Arithmetic("float64", "int64", "uint8", False)  # ONNX Runtime: scipy's arithmetic
FLOAT32 = Arithmetic("float32", "int32", "int32", True)  # TensorRT: it has no float64 tensors


class DeviceStepUnavailable(RuntimeError):
    """This volume's step cannot run on the device (the message says why and names the device); the
    run path then does it on the CPU path."""


class DeviceMemoryError(DeviceStepUnavailable):
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

    def labels_on_input_grid(self, probabilities: ModelGridArray, input_shape_nib: Sequence[int]) -> np.ndarray:
        """(C, D, H, W) probabilities on the model grid -> uint8 labels (X, Y, Z) on the input grid
        (a DeviceArray of this device's backend is used where it is, any other downloaded)."""
        ...

    def map_on_input_grid(self, values: ModelGridArray, input_shape_nib: Sequence[int]) -> np.ndarray:
        """(D, H, W) float map on the model grid -> float32 (X, Y, Z) on the input grid."""
        ...


def axis_feeds(
    sizes_in: Sequence[int],
    sizes_out: Sequence[int],
    *,
    index_dtype: str = "int64",
    weight_dtype: str = "float64",
) -> dict[str, np.ndarray]:
    """Per spatial axis a of a (D, H, W)-like array: the two source indices (i0_a, i1_a) and the
    weight (w_a, shaped to broadcast along a) of every output index, at zoom's own coordinates."""
    feeds: dict[str, np.ndarray] = {}
    for axis, (n_in, n_out) in enumerate(zip(sizes_in, sizes_out)):
        x = zoom_coordinates(int(n_in), int(n_out))
        low = np.minimum(np.floor(x).astype(np.int64), n_in - 1)
        shape = [1, 1, 1]
        shape[axis] = int(n_out)
        feeds[f"i0_{axis}"] = low.astype(index_dtype)
        feeds[f"i1_{axis}"] = np.minimum(low + 1, n_in - 1).astype(index_dtype)
        feeds[f"w_{axis}"] = (x - low).reshape(shape).astype(weight_dtype)
    return feeds
