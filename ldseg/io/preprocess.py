"""The official LDSeg preprocessing, reproduced exactly, and its inverse for outputs.

3D (knee): the official code reads with SimpleITK, whose array order is nibabel's reversed, so
model order (D, H, W) = nibabel (X, Y, Z).transpose(2, 1, 0). Images are min-max standardized
to [0, 1] and resampled with scipy.ndimage.zoom(order=1, mode="nearest"); each label class is
resampled as its own integer 0/1 mask and higher classes win wherever their mask is non-zero.

2D (GlaS): OpenCV INTER_NEAREST resize to the model grid, then min-max standardization over all
channels; labels are binarized (instance id > 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_TO_MODEL = (2, 1, 0)  # nibabel (X, Y, Z) <-> model (D, H, W); the permutation is its own inverse


def _as_shape(shape: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(s) for s in shape)
    if any(s <= 0 for s in out):
        raise ValueError(f"invalid shape {out}")
    return out


def min_max_standardize(array: np.ndarray) -> np.ndarray:
    """(x - min) / max(x - min) in float32, as the official code; [0, 1] with both ends hit."""
    x = np.asarray(array, dtype=np.float32)
    shifted = x - x.min()
    peak = shifted.max()
    if not peak > 0:  # also catches NaN
        raise ValueError("cannot min-max standardize a constant (or NaN) image")
    return shifted / peak


def zoom_to(array: np.ndarray, shape: Sequence[int], *, order: int = 1) -> np.ndarray:
    """scipy.ndimage.zoom(order, mode="nearest") to exactly `shape`.

    With grid_mode=False (the default, used by the official code) zoom samples input coordinate
    i * (in - 1) / (out - 1); the factor only decides the output size via round(in * factor).
    So factors target/size give the official result, and nudging a factor whose product rounds
    the wrong way (float error) changes nothing but the size.
    """
    from scipy import ndimage  # here, not at import: 0.1-0.4 s a run pays on its reading thread

    target = _as_shape(shape)
    if array.ndim != len(target):
        raise ValueError(f"cannot zoom a {array.ndim}D array to {len(target)}D shape {target}")
    factors = [t / s for t, s in zip(target, array.shape)]
    out: np.ndarray = ndimage.zoom(array, factors, order=order, mode="nearest")
    if out.shape != target:
        factors = [(t + 0.25) / s for t, s in zip(target, array.shape)]
        out = ndimage.zoom(array, factors, order=order, mode="nearest")
    if out.shape != target:  # pragma: no cover - would be a scipy behaviour change
        raise RuntimeError(f"zoom produced {out.shape}, expected {target}")
    return out


def _masks_to_labels(seg: np.ndarray, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Official label resampling: zoom each class's int64 0/1 mask; higher classes overwrite.

    Zooming an integer array gives integers (scipy rounds half away from zero), so a voxel
    joins class c where its interpolated mask is >= 0.5.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    labels = np.zeros(shape, dtype=np.uint8)
    for c in range(1, num_classes):
        mask = zoom_to(np.where(seg == c, 1, 0).astype(np.int64, copy=False), shape)
        labels[mask > 0] = c
    return labels


def _check_3d(array: np.ndarray, grid: tuple[int, ...], what: str) -> None:
    if array.ndim != 3 or len(grid) != 3:
        raise ValueError(f"{what}: need a 3D array and 3D grid, got {array.shape} and {grid}")


def image_to_model_grid(array_nib: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Input image -> model input, float32 in [0, 1].

    3D grid (D, H, W): `array_nib` in nibabel order (X, Y, Z) -> (D, H, W).
    2D grid (H, W): `array_nib` is an image (H, W, C) or (H, W) -> (C, H, W), see
    image2d_to_model_grid.
    """
    target = _as_shape(grid)
    if len(target) == 2:
        return image2d_to_model_grid(array_nib, target)
    _check_3d(array_nib, target, "image_to_model_grid")
    vol = min_max_standardize(np.asarray(array_nib).transpose(_TO_MODEL))
    return zoom_to(vol, target).astype(np.float32, copy=False)


def labels_to_model_grid(label_nib: np.ndarray, grid: Sequence[int], num_classes: int) -> np.ndarray:
    """Input label map -> model grid, uint8. 3D: nibabel order in, (D, H, W) out, official
    per-class rule. 2D: binarized nearest resize (num_classes must be 2)."""
    target = _as_shape(grid)
    if len(target) == 2:
        if num_classes != 2:
            raise ValueError(f"2D labels are binarized (num_classes=2), got {num_classes}")
        return labels2d_to_model_grid(label_nib, target)
    _check_3d(label_nib, target, "labels_to_model_grid")
    return _masks_to_labels(np.asarray(label_nib).transpose(_TO_MODEL), target, num_classes)


AMBIGUOUS = 255  # a model-grid voxel whose top two classes are within MARGIN: always interpolated
MARGIN = 1e-5  # >> float32 rounding of a probability (6e-8): beyond it no interpolation can reorder classes


def zoom_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """The input coordinate of each output index under zoom_to (grid_mode=False): i * (in - 1) / (out - 1)."""
    if n_out == 1 or n_in == 1:
        return np.zeros(n_out)
    return np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))


def probabilities_to_input_grid(probs: np.ndarray, input_shape_nib: Sequence[int]) -> np.ndarray:
    """Class probabilities (C, D, H, W) on the model grid -> uint8 labels (X, Y, Z) on the input.

    Defined as: each class map zoomed (order=1, float32) to the input's (D, H, W), then argmax (ties ->
    lower class, as np.argmax). Computed without zooming every class everywhere (most of a knee
    volume's time outside the model's stages): an output voxel whose 8 source voxels share one
    class, each by more than MARGIN, takes that class (a convex combination cannot reorder classes
    separated by more than rounding); only the others, near class boundaries, are interpolated
    (map_coordinates: zoom's own kernel at zoom's own coordinates). tests/io/test_preprocess.py
    checks it against the definition voxel for voxel.
    """
    shape_nib = _as_shape(input_shape_nib)
    if probs.ndim != 4 or len(shape_nib) != 3:
        raise ValueError(f"need probs (C, D, H, W) and a 3D input shape, got {probs.shape}, {shape_nib}")
    target = shape_nib[::-1]
    model = np.argmax(probs, axis=0).astype(np.uint8)
    if probs.shape[0] > 1:
        top2 = np.partition(probs, probs.shape[0] - 2, axis=0)[-2:]
        model[(top2[1] - top2[0]) <= MARGIN] = AMBIGUOUS
    low, high = model, model
    coords = []
    for axis, (n_in, n_out) in enumerate(zip(probs.shape[1:], target)):
        x = zoom_coordinates(n_in, n_out)
        i0 = np.minimum(np.floor(x).astype(np.intp), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        coords.append(x)
        low = np.minimum(np.take(low, i0, axis=axis), np.take(low, i1, axis=axis))
        high = np.maximum(np.take(high, i0, axis=axis), np.take(high, i1, axis=axis))
    labels = low
    edge = np.nonzero((low != high) | (low == AMBIGUOUS))
    if edge[0].size:
        from scipy import ndimage

        points = np.stack([coords[axis][edge[axis]] for axis in range(3)])
        best = np.full(edge[0].size, -np.inf, np.float32)
        chosen = np.zeros(edge[0].size, np.uint8)
        for c in range(probs.shape[0]):
            plane = np.asarray(probs[c], dtype=np.float32)
            value = ndimage.map_coordinates(plane, points, order=1, mode="nearest", output=np.float32)
            wins = value > best
            chosen[wins] = c
            np.maximum(best, value, out=best)
        labels[edge] = chosen
    return labels.transpose(_TO_MODEL)


def labels_to_input_grid(labels: np.ndarray, input_shape_nib: Sequence[int], num_classes: int) -> np.ndarray:
    """Model-grid labels (D, H, W) -> uint8 labels (X, Y, Z) with the official per-class rule."""
    shape_nib = _as_shape(input_shape_nib)
    if labels.ndim != 3 or len(shape_nib) != 3:
        raise ValueError(f"need 3D labels and a 3D input shape, got {labels.shape}, {shape_nib}")
    return _masks_to_labels(labels, shape_nib[::-1], num_classes).transpose(_TO_MODEL)


# --- 2D -------------------------------------------------------------------------------------


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each destination index, as OpenCV's INTER_NEAREST computes it.

    OpenCV uses floor(dst_index * (1.0 / (dst / src))) in double precision, clipped to src - 1.
    That is floor(dst_index * src / dst) up to float rounding, and differs from exact integer
    floor at a few indices (e.g. src=2, dst=98, index 49 -> 0, not 1); we match OpenCV.
    """
    if src <= 0 or dst <= 0:
        raise ValueError(f"invalid sizes src={src}, dst={dst}")
    inv_scale = 1.0 / (dst / src)
    idx = np.floor(np.arange(dst, dtype=np.float64) * inv_scale).astype(np.int64)
    return np.minimum(idx, src - 1)


def resize_nearest(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """cv2.resize(array, (W, H), interpolation=INTER_NEAREST) for (H, W) or (H, W, C) arrays."""
    h, w = _as_shape(size)
    rows = nearest_indices(array.shape[0], h)
    cols = nearest_indices(array.shape[1], w)
    return array[rows[:, None], cols[None, :]]


def image2d_to_model_grid(rgb: np.ndarray, grid: Sequence[int] = (512, 512)) -> np.ndarray:
    """(H, W, C) or (H, W) image -> (C, h, w) float32 in [0, 1]: nearest resize, then min-max
    over all channels together (official order)."""
    if rgb.ndim == 2:
        rgb = rgb[:, :, None]
    if rgb.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {rgb.shape}")
    resized = resize_nearest(np.asarray(rgb), grid)
    return np.ascontiguousarray(min_max_standardize(resized).transpose(2, 0, 1))


def labels2d_to_model_grid(labels: np.ndarray, grid: Sequence[int] = (512, 512)) -> np.ndarray:
    """(H, W) instance ids -> (h, w) uint8 foreground mask: nearest resize, then id > 0."""
    if labels.ndim != 2:
        raise ValueError(f"expected (H, W) labels, got shape {labels.shape}")
    return (resize_nearest(np.asarray(labels), grid) > 0).astype(np.uint8)


def probabilities2d_to_input_grid(probs: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """(C, h, w) probabilities -> (H, W) uint8 labels on the input grid.

    Nearest resize only picks pixels, so argmax-then-resize equals resize-then-argmax.
    """
    if probs.ndim != 3:
        raise ValueError(f"expected (C, h, w) probabilities, got shape {probs.shape}")
    labels = np.argmax(probs, axis=0).astype(np.uint8)
    return resize_nearest(labels, input_shape)
