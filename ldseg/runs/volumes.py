"""From files to model-grid arrays and back: one shared pre/post-processing for every backend.

`ops` (a backend's VolumeOps, ldseg/runtime/volume_ops.py) moves a 3D volume's resampling to the
device the model runs on; without it, the CPU reference path runs (ldseg.io.preprocess). A step the
device has no memory for runs on the CPU path instead, with a warning naming the file."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldseg.errors import InputError
from ldseg.io.formats import EXTENSIONS, VOLUME_SUFFIXES, WRITERS, format_of, holds_dicom
from ldseg.io.image2d import Image2D, read_image2d, read_label2d, write_label2d
from ldseg.io.nifti import Volume, read_label_volume
from ldseg.io.preprocess import (
    image2d_to_model_grid,
    image_to_model_grid,
    labels2d_to_model_grid,
    labels_to_model_grid,
    probabilities2d_to_input_grid,
    probabilities_to_input_grid,
    resize_nearest,
    zoom_to,
)
from ldseg.model.config import ModelConfig
from ldseg.runtime.samples import ModelGridArray, host
from ldseg.runtime.volume_ops import DeviceStepUnavailable, VolumeOps

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


def stem(path: Path) -> str:
    name = path.name
    if path.is_dir():  # a DICOM series folder
        return name
    for suffix in (".nii.gz", *VOLUME_SUFFIXES, *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_input_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES + IMAGE_SUFFIXES) and not path.name.startswith(".")


def expand_folder(folder: Path) -> list[Path]:
    """The inputs a folder stands for: its volume and image files, and itself if it holds DICOM
    slices (a series folder is one input); failing both, its subfolders that hold DICOM slices
    (a study exported one series per folder)."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and is_input_file(p))
    if holds_dicom(folder):
        found.append(folder)
    if not found:
        found = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".") and holds_dicom(p)]
    if not found:
        raise InputError(
            f"{folder}: no .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd/.png/.bmp/.jpg/.tif files "
            "and no DICOM files in this folder"
        )
    return found


@dataclass(frozen=True)
class Prepared:
    """A model-grid image (C, *grid) plus what is needed to write results on the input's grid."""

    path: Path
    image: np.ndarray
    reference: Volume | Image2D

    @property
    def input_shape(self) -> tuple[int, ...]:
        shape = self.reference.array.shape
        return tuple(shape[:2] if isinstance(self.reference, Image2D) else shape)


def prepare(path: Path, cfg: ModelConfig, series: str | None = None, ops: VolumeOps | None = None) -> Prepared:
    """Read and preprocess one input exactly as the official pipeline does.

    3D: any volume format (ldseg.io.formats picks the reader); `series` picks a DICOM series; with
    `ops`, min-max and the zoom run on the backend's device."""
    if cfg.spatial_dims == 3:
        if path.name.lower().endswith(IMAGE_SUFFIXES):
            raise InputError(f"{path}: a 3D model needs a volume (NIfTI, NRRD, MetaImage or a DICOM series folder)")
        volume = format_of(path).read(path, series=series)
        if volume.array.ndim != 3:
            raise InputError(f"{path}: expected a 3D volume, got shape {volume.array.shape}")
        try:
            image = _on_device(
                ops,
                lambda o: o.to_model_grid(volume.array, cfg.image_size),
                lambda: image_to_model_grid(volume.array, cfg.image_size),
                path,
            )[None]
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from exc
        return Prepared(path, image.astype(np.float32), volume)
    picture = read_image2d(path)
    if picture.array.shape[-1] != cfg.image_channels:
        raise InputError(f"{path}: {picture.array.shape[-1]} channels, the model needs {cfg.image_channels}")
    try:
        image = image2d_to_model_grid(picture.array, cfg.image_size)
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from exc
    return Prepared(path, image.astype(np.float32), picture)


def prepare_label(path: Path, cfg: ModelConfig) -> np.ndarray:
    """A reference label on the model grid (for --reconstruct and training)."""
    if cfg.spatial_dims == 3:
        volume = read_label_volume(path)
        labels = volume.array.astype(np.int64)
        if labels.min() < 0 or labels.max() >= cfg.num_classes:
            raise InputError(f"{path}: label values {labels.min()}..{labels.max()} outside 0..{cfg.num_classes - 1}")
        return labels_to_model_grid(labels, cfg.image_size, cfg.num_classes)
    return labels2d_to_model_grid(read_label2d(path), cfg.image_size)


def read_reference_labels(path: Path, prepared: Prepared, cfg: ModelConfig) -> np.ndarray:
    """A reference label for Dice on the input's own grid, checked against the input (InputError)."""
    if isinstance(prepared.reference, Image2D):
        labels = read_label2d(path)
        if cfg.num_classes == 2:
            labels = (labels > 0).astype(np.uint8)  # instance ids, binarized as the official pipeline
    else:
        labels = read_label_volume(path).array
    if labels.shape != prepared.input_shape:
        raise InputError(
            f"{path}: label of shape {labels.shape}, its image {prepared.path.name} has shape {prepared.input_shape}"
        )
    if labels.max() >= cfg.num_classes:
        raise InputError(f"{path}: label values up to {labels.max()}, the model has classes 0..{cfg.num_classes - 1}")
    return labels


def to_input_grid(prepared: Prepared, probabilities: ModelGridArray, ops: VolumeOps | None = None) -> np.ndarray:
    """(K, *grid) probabilities -> uint8 labels on the input's grid and axis order (a result left on
    the device goes to `ops` as it is; the CPU path downloads it)."""
    if isinstance(prepared.reference, Image2D):
        return probabilities2d_to_input_grid(host(probabilities), prepared.input_shape)
    return _on_device(
        ops,
        lambda o: o.labels_on_input_grid(probabilities, prepared.input_shape),
        lambda: probabilities_to_input_grid(host(probabilities), prepared.input_shape),
        prepared.path,
    )


def map_to_input_grid(prepared: Prepared, values: ModelGridArray, ops: VolumeOps | None = None) -> np.ndarray:
    """A float map on the model grid (e.g. uncertainty) -> input grid, linear (3D) / nearest (2D)."""
    if isinstance(prepared.reference, Image2D):
        return resize_nearest(host(values), prepared.input_shape).astype(np.float32)
    shape_dhw = tuple(reversed(prepared.input_shape))
    return _on_device(
        ops,
        lambda o: o.map_on_input_grid(values, prepared.input_shape),
        lambda: zoom_to(host(values).astype(np.float32), shape_dhw).transpose(2, 1, 0),
        prepared.path,
    )


def _on_device(
    ops: VolumeOps | None, on_device: Callable[[VolumeOps], np.ndarray], on_cpu: Callable[[], np.ndarray], path: Path
) -> np.ndarray:
    """A volume step on the backend's device when it offers one; where the device cannot take it (out
    of memory, outside TensorRT's built range), the CPU path (the reference) for this step, with a
    warning naming the file."""
    if ops is None:
        return on_cpu()
    try:
        return on_device(ops)
    except DeviceStepUnavailable as exc:
        warnings.warn(f"{path}: {exc}; resampled on the CPU instead", RuntimeWarning, stacklevel=2)
        return on_cpu()


def output_path(out_dir: Path, input_path: Path, cfg: ModelConfig, suffix: str, output_type: str = "nifti") -> Path:
    """Where the `suffix` map of `input_path` goes: known before the input is read, so a run can
    refuse (or skip) existing outputs without computing them first."""
    extension = EXTENSIONS[output_type] if cfg.spatial_dims == 3 else ".png"
    return out_dir / f"{stem(input_path)}{suffix}{extension}"


def write_map(
    path: Path,
    prepared: Prepared,
    values: np.ndarray,
    *,
    overwrite: bool,
    dtype: type,
    output_type: str = "nifti",
    description: str | None = None,
) -> None:
    """`description`: the header's descrip (NIfTI; a key in NRRD/MetaImage), or a PNG tEXt chunk."""
    if isinstance(prepared.reference, Image2D):
        if np.dtype(dtype) != np.uint8:
            values = np.clip(values * 255.0, 0, 255)  # PNG: float maps in [0, 1] scaled to 0..255
        write_label2d(path, values.astype(np.uint8), overwrite=overwrite, description=description)
    else:
        WRITERS[output_type].write(
            path, values, prepared.reference, overwrite=overwrite, dtype=dtype, description=description
        )
