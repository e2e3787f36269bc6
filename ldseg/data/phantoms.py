"""Synthetic segmentation phantoms for tests and the demo (made from scratch, no real data).

Each seed gives a volume (D, H, W) or image (H, W) in model order with num_classes - 1 smooth,
rotated (super)ellipsoids, one per class, inside the field of view and not overlapping, each
covering at least 3% of it. Intensities mimic an MRI: a mean per class (ordered by class, random
contrast), partial-volume blur, a smooth multiplicative bias field, Gaussian noise, then a random
scanner offset and scale. Raw intensities are whole numbers in int16 range, so writing them as
int16 NIfTI is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ldseg.errors import OutputError
from ldseg.io.atomic import atomic_write
from ldseg.io.preprocess import min_max_standardize
from ldseg.model.config import ModelConfig

MIN_FRACTION = 0.03  # each structure covers at least this much of the field of view
_MAX_TRIES = 200


@dataclass(frozen=True)
class Phantom:
    image: np.ndarray  # float32 raw intensities (whole numbers), model order
    label: np.ndarray  # uint8 class ids, same shape


def _random_rotation(rng: np.random.Generator, n: int) -> np.ndarray:
    # QR of a Gaussian matrix with the sign fix gives a uniformly random orthogonal matrix.
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return np.asarray(q * np.sign(np.diag(r)))


def _structures(rng: np.random.Generator, axes: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Rejection-sample `count` disjoint superellipsoid masks inside the field of view."""
    n = len(axes)
    # one structure: centered; two: either side of the center along a random direction
    offsets = np.linspace(-0.45, 0.45, count) if count == 2 else np.zeros(1)
    masks: list[np.ndarray] = []
    for _ in range(_MAX_TRIES):
        direction = rng.normal(size=n)
        direction /= np.linalg.norm(direction)
        masks = []
        for k in range(count):
            center = offsets[k] * direction + rng.normal(scale=0.05, size=n)
            radii = rng.uniform(0.36, 0.55, size=n)
            power = 2.0 if k == 0 else rng.uniform(2.0, 3.0)  # class 2: a boxier superellipsoid
            rot = _random_rotation(rng, n)
            level = sum(
                np.abs(sum(rot[j, i] * (axes[j] - center[j]) for j in range(n)) / radii[i]) ** power for i in range(n)
            )
            masks.append(np.asarray(level <= 1.0))
        if _acceptable(masks):
            return masks
    return masks  # pragma: no cover - practically unreachable; overlaps resolved by class order


def _acceptable(masks: list[np.ndarray]) -> bool:
    total = np.zeros(masks[0].shape, dtype=np.int8)
    for mask in masks:
        if mask.mean() < MIN_FRACTION:
            return False
        for axis in range(mask.ndim):
            edges = np.take(mask, [0, -1], axis=axis)
            if edges.any():  # touching the border = cut off by the field of view
                return False
        total += mask
    return bool(total.max() <= 1)


def _bias_field(rng: np.random.Generator, axes: list[np.ndarray]) -> np.ndarray:
    """exp of a random quadratic: smooth, positive, roughly +-25% across the field of view."""
    log_field = sum(rng.normal(scale=0.12) * a for a in axes)
    for i in range(len(axes)):
        for j in range(i, len(axes)):
            log_field = log_field + rng.normal(scale=0.06) * axes[i] * axes[j]
    return np.exp(np.asarray(log_field))


def make_phantom(seed: int, shape: tuple[int, ...] = (32, 64, 64), num_classes: int = 3) -> Phantom:
    """A deterministic random phantom: 3D (D, H, W) or 2D (H, W) in model order."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise ValueError(f"shape must be 2D or 3D with every side >= 8, got {shape}")
    if num_classes not in (2, 3):  # two structures of >= 3% each fit; more would not
        raise ValueError(f"num_classes must be 2 or 3, got {num_classes}")
    rng = np.random.default_rng(seed)
    n = len(shape)
    # Normalized coordinates in [-1, 1] per axis, as broadcastable open grids (cheap).
    axes = [np.linspace(-1.0, 1.0, s).reshape([s if k == i else 1 for k in range(n)]) for i, s in enumerate(shape)]
    label = np.zeros(shape, dtype=np.uint8)
    for c, mask in enumerate(_structures(rng, axes, num_classes - 1), start=1):
        label[mask] = c

    steps = rng.uniform(0.5, 0.9, size=num_classes - 1)  # contrast between successive classes
    levels = np.concatenate([[1.0], 1.0 + np.cumsum(steps)])
    tissue = ndimage.gaussian_filter(levels[label], sigma=0.6)  # partial-volume edges
    noise = rng.normal(scale=rng.uniform(0.12, 0.22), size=shape)
    signal = _bias_field(rng, axes) * tissue + noise
    scale, offset = rng.uniform(60.0, 600.0), rng.uniform(-300.0, 300.0)
    raw = np.clip(np.round(offset + scale * signal), -32768, 32767)
    return Phantom(image=raw.astype(np.float32), label=label)


def phantom_affine(shape_nib: tuple[int, ...]) -> np.ndarray:
    """1 mm isotropic, RAS axes, origin at the volume's center."""
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(shape_nib[:3], dtype=np.float64) - 1) / 2
    return affine


def _nifti(array_nib: np.ndarray, dtype: type[np.generic]) -> nib.Nifti1Image:
    affine = phantom_affine(array_nib.shape)
    img = nib.Nifti1Image(array_nib.astype(dtype), affine, dtype=dtype)
    img.set_qform(affine, code=1)  # scanner coordinates, both forms, like real scans
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_phantom_nifti(phantom: Phantom, image_path: Path, label_path: Path, overwrite: bool) -> None:
    """Write a 3D phantom as NIfTI in nibabel order (X, Y, Z) = model order reversed.

    The image is int16 (lossless: intensities are whole numbers in range), the label uint8, so
    read_volume + image_to_model_grid on the phantom's own shape reproduces
    min_max_standardize(phantom.image).
    """
    if phantom.image.ndim != 3:
        raise ValueError("only 3D phantoms can be written as NIfTI")
    image_path, label_path = Path(image_path), Path(label_path)
    if not overwrite:  # refuse before writing either file, not halfway through
        for path in (image_path, label_path):
            if path.exists():
                raise OutputError(f"{path}: exists (use --overwrite)")
    image = _nifti(phantom.image.transpose(2, 1, 0), np.int16)
    label = _nifti(phantom.label.transpose(2, 1, 0), np.uint8)
    atomic_write(image_path, lambda tmp: nib.save(image, tmp), overwrite)
    atomic_write(label_path, lambda tmp: nib.save(label, tmp), overwrite)


def phantom_model_image(cfg: ModelConfig, seed: int) -> np.ndarray:
    """One phantom as a model input, (C, *grid) float32: min-max standardized as a run's inputs are,
    grey replicated over the image channels; 2 or 3 classes (what phantoms have; the image is what
    matters to a model of more)."""
    image = min_max_standardize(make_phantom(seed, cfg.image_size, min(max(cfg.num_classes, 2), 3)).image)
    return np.repeat(image[None], cfg.image_channels, axis=0).astype(np.float32)


def blurred_probabilities(labels: np.ndarray, classes: int, sigma: float = 1.5) -> np.ndarray:
    """Smooth class probabilities (classes, *labels.shape) float32 with real boundaries: each class's
    one-hot mask blurred (Gaussian, `sigma` voxels), floored at 1e-3 and normalized. What resampling
    checks use instead of running a model."""
    soft = np.stack([ndimage.gaussian_filter((labels == c).astype(np.float32), sigma) + 1e-3 for c in range(classes)])
    return (soft / soft.sum(axis=0)).astype(np.float32)
