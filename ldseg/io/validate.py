"""Checks every volume reader applies, whatever the format: one wording, one behaviour.

Each raises InputError naming the file; they mirror what the NIfTI reader has always refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ldseg.errors import InputError

DEFAULT_MAX_VOXELS = 512**3


def check_shape(path: Path, shape: Sequence[int], max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[int, int, int]:
    """A 3D shape (a trailing axis of one frame is dropped), non-empty, within the voxel limit.

    Called on header information before any voxel is read: a lying header must not exhaust memory."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InputError(f"{path}: invalid shape {shape} in the header (negative size)")
    if len(shape) < 3:
        raise InputError(f"{path}: {len(shape)}D image of shape {shape}; a 3D volume is required")
    if len(shape) > 3 and math.prod(shape[3:]) != 1:
        raise InputError(
            f"{path}: {len(shape)}D image of shape {shape} with {math.prod(shape[3:])} frames; "
            "a single 3D volume is required"
        )
    x, y, z = shape[:3]
    if 0 in (x, y, z):
        raise InputError(f"{path}: empty volume of shape {(x, y, z)}")
    voxels = x * y * z
    if voxels > max_voxels:
        raise InputError(
            f"{path}: volume of shape {(x, y, z)} has {voxels} voxels, over the limit of {max_voxels} voxels"
        )
    return x, y, z


def check_intensities(path: Path, array: np.ndarray) -> None:
    """Finite, not constant, and a range float32 min-max standardization can represent."""
    lo, hi = float(array.min()), float(array.max())  # NaN propagates; +-Inf shows up here too
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{path}: image contains NaN or infinite intensities")
    if lo == hi:
        raise InputError(f"{path}: constant image (every voxel is {lo:g}); min-max standardization needs contrast")
    with np.errstate(over="ignore"):
        span = np.float32(hi) - np.float32(lo)
    if not math.isfinite(span):  # the float32 standardization would turn it into NaN
        raise InputError(f"{path}: intensity range {lo:g} to {hi:g} is too wide for float32 standardization")


def as_label_ids(path: Path, raw: np.ndarray) -> np.ndarray:
    """Non-negative whole numbers as uint8, or uint16/uint32 if the ids need it."""
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)):
            raise InputError(f"{path}: label map contains NaN or infinite values")
        if not np.array_equal(raw, np.round(raw)):
            raise InputError(f"{path}: label map has non-integer values")
    elif raw.dtype.kind not in "iub":
        raise InputError(f"{path}: label map has unsupported data type {raw.dtype}")
    lo, hi = float(raw.min()), float(raw.max())
    if lo < 0:
        raise InputError(f"{path}: label map has negative labels (min {lo:g})")
    if hi > np.iinfo(np.uint32).max:
        raise InputError(f"{path}: label ids up to {hi:g} exceed uint32")
    dtype = np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32
    return raw.astype(dtype)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
