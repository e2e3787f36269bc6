"""One preview picture per volume: image, label overlay and (K >= 2) vote entropy.

3D: three orthogonal slices (axial, coronal, sagittal) through the centre of mass of the segmented
structures, in the closest RAS orientation, shown in the neurological convention (R on the right,
A and S up) with the voxel spacing as aspect ratio. 2D: the image, the overlay and the entropy.
Uses matplotlib's object API with the Agg canvas: no pyplot, no global state, no display.
"""

from __future__ import annotations

import io
from typing import Literal

import nibabel as nib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from ldseg.qc.classes import class_color

OVERLAY_ALPHA = 0.45
PANEL_INCHES = 2.6
DPI = 100


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display range: 0.5 / 99.5 percentiles, on a subsample (a knee volume has 4M voxels)."""
    step = max(1, int(round((image.size / 500_000) ** (1 / image.ndim))))
    sample = image[tuple(slice(None, None, step) for _ in range(image.ndim))]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _overlay(seg: np.ndarray) -> np.ndarray:
    """RGBA picture of a label slice: class colours, transparent background."""
    rgba = np.zeros((*seg.shape, 4), dtype=np.float32)
    for c in np.unique(seg):
        if c == 0:
            continue
        rgba[seg == c] = (*class_color(int(c)), OVERLAY_ALPHA)
    return rgba


def _centre(seg: np.ndarray) -> tuple[int, ...]:
    """Per axis, the slice through the structures' centre of mass, moved to the nearest slice that
    cuts at least half the largest structure area along that axis: the centre of two structures
    (femur and tibia) can lie in the empty space between them. The volume's centre if empty."""
    mask = seg > 0
    if not mask.any():
        return tuple(s // 2 for s in seg.shape)
    centre = []
    for axis in range(seg.ndim):
        area = mask.sum(axis=tuple(a for a in range(seg.ndim) if a != axis))
        index = np.arange(area.size)
        com = float((area * index).sum() / area.sum())
        candidates = index[area >= area.max() / 2]
        centre.append(int(candidates[np.argmin(np.abs(candidates - com))]))
    return tuple(centre)


def _to_ras(arrays: list[np.ndarray], affine: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Reorient (X, Y, Z) arrays to the closest RAS axes; returns them and the voxel sizes."""
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ras_zooms = np.empty(3)
    for src, (dst, _) in enumerate(transform):
        ras_zooms[int(dst)] = zooms[src]
    return [nib.orientations.apply_orientation(a, transform) for a in arrays], ras_zooms


def _slices(volume: np.ndarray, centre: tuple[int, ...]) -> list[np.ndarray]:
    """Axial, coronal, sagittal planes of a RAS volume, as (rows, cols) for origin="lower"."""
    x, y, z = centre
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]


_VIEWS = (("axial", ("R", "A"), (0, 1)), ("coronal", ("R", "S"), (0, 2)), ("sagittal", ("A", "S"), (1, 2)))


def _axes_grid(fig: Figure, rows: int, cols: int) -> list[list[Axes]]:
    grid = fig.subplots(rows, cols, squeeze=False)
    for ax in grid.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return [list(row) for row in grid]


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _entropy_panel(
    ax: Axes, image: np.ndarray, entropy: np.ndarray, window: tuple[float, float], aspect: float,
    origin: Literal["lower", "upper"] = "lower",
) -> AxesImage:
    """Entropy in colour over the dimmed image (zero entropy shows the image: where it lies)."""
    lo, hi = window
    ax.imshow(image, cmap="gray", vmin=lo, vmax=lo + 2.5 * (hi - lo), origin=origin, aspect=aspect,
              interpolation="nearest")  # dimmed: the colours stand out
    return ax.imshow(np.ma.masked_less_equal(entropy, 0.0), cmap="magma", vmin=0.0, vmax=1.0,
                     origin=origin, aspect=aspect, interpolation="nearest")


def preview_3d(
    image: np.ndarray, seg: np.ndarray, entropy: np.ndarray | None, affine: np.ndarray, title: str
) -> bytes:
    """PNG bytes for a volume; arrays in nibabel order (X, Y, Z) on the input grid."""
    arrays = [image, seg] + ([entropy] if entropy is not None else [])
    ras, zooms = _to_ras(arrays, affine)
    image, seg = ras[0], ras[1]
    centre = _centre(seg)
    lo, hi = _window(image)
    rows = 3 if entropy is not None else 2
    fig = Figure(figsize=(3 * PANEL_INCHES, rows * PANEL_INCHES + 0.4), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=9)
    grid = _axes_grid(fig, rows, 3)
    for col, ((view, (right, up), (ax_h, ax_v)), img_s, seg_s) in enumerate(
        zip(_VIEWS, _slices(image, centre), _slices(seg, centre))
    ):
        aspect = zooms[ax_v] / zooms[ax_h]
        for row in (0, 1):
            grid[row][col].imshow(img_s, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                                  interpolation="nearest")
        grid[1][col].imshow(_overlay(seg_s), origin="lower", aspect=aspect, interpolation="nearest")
        grid[0][col].set_title(f"{view} ({'xyz'[3 - ax_h - ax_v]} = {centre[3 - ax_h - ax_v]})", fontsize=8)
        grid[0][col].text(0.98, 0.5, right, transform=grid[0][col].transAxes, color="yellow", fontsize=8,
                          ha="right", va="center")
        grid[0][col].text(0.5, 0.98, up, transform=grid[0][col].transAxes, color="yellow", fontsize=8,
                          ha="center", va="top")
        if entropy is not None:
            shown = _entropy_panel(grid[2][col], img_s, _slices(ras[2], centre)[col], (lo, hi), aspect)
    grid[0][0].set_ylabel("image", fontsize=8)
    grid[1][0].set_ylabel("segmentation", fontsize=8)
    if entropy is not None:
        grid[2][0].set_ylabel("vote entropy", fontsize=8)
        fig.colorbar(shown, ax=[ax for row in grid for ax in row], shrink=0.25, anchor=(0.0, 0.05), pad=0.01)
    return _png(fig)


def preview_2d(image: np.ndarray, seg: np.ndarray, entropy: np.ndarray | None, title: str) -> bytes:
    """PNG bytes for a 2D image (H, W, C) as read, with its (H, W) labels and entropy."""
    lo, hi = float(image.min()), float(image.max())
    shown_image = np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if shown_image.shape[-1] == 1:
        shown_image = shown_image[..., 0]
    cols = 3 if entropy is not None else 2
    h, w = seg.shape
    panel_h = PANEL_INCHES * min(max(h / w, 0.3), 3.0)
    fig = Figure(figsize=(cols * PANEL_INCHES, panel_h + 0.5), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=9)
    axes = _axes_grid(fig, 1, cols)[0]
    axes[0].imshow(shown_image, cmap="gray", interpolation="nearest")
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(shown_image, cmap="gray", interpolation="nearest")
    axes[1].imshow(_overlay(seg), interpolation="nearest")
    axes[1].set_title("segmentation", fontsize=8)
    if entropy is not None:
        gray = shown_image.mean(axis=-1) if shown_image.ndim == 3 else shown_image
        shown = _entropy_panel(axes[2], gray, entropy, (0.0, 1.0), 1.0, origin="upper")
        axes[2].set_title("vote entropy", fontsize=8)
        fig.colorbar(shown, ax=axes[2], shrink=0.8, pad=0.01)
    return _png(fig)
