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
FIGURE_INCHES = 8.0  # width at most; a row is at most MAX_ROW_INCHES tall
MAX_ROW_INCHES = 3.0
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


def _figure(
    sizes: list[tuple[float, float]], row_names: list[str], title: str, colorbar: bool
) -> tuple[Figure, list[list[Axes]], Axes | None]:
    """len(row_names) x len(sizes) panels placed by hand, column c sized for sizes[c] (physical
    width, height). matplotlib's constrained layout would cost more than all the drawing."""
    left, right, top, bottom, gap = 0.3, 0.7 if colorbar else 0.1, 0.5, 0.08, 0.08
    rows, cols, tallest = len(row_names), len(sizes), max(h for _, h in sizes)
    scale = min((FIGURE_INCHES - left - right - gap * (cols - 1)) / sum(w for w, _ in sizes), MAX_ROW_INCHES / tallest)
    row_h = tallest * scale
    fig_w = left + right + gap * (cols - 1) + scale * sum(w for w, _ in sizes)
    fig_h = top + rows * row_h + (rows - 1) * gap + bottom
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    fig.suptitle(title, fontsize=9, y=1 - 0.06 / fig_h, va="top")
    grid = []
    for r, name in enumerate(row_names):
        y = fig_h - top - (r + 1) * row_h - r * gap
        fig.text(0.5 * left / fig_w, (y + row_h / 2) / fig_h, name, rotation=90, ha="center", va="center", fontsize=8)
        x, row = left, []
        for w, _ in sizes:
            ax = fig.add_axes((x / fig_w, y / fig_h, w * scale / fig_w, row_h / fig_h))
            ax.set_axis_off()
            row.append(ax)
            x += w * scale + gap
        grid.append(row)
    if not colorbar:
        return fig, grid, None
    return fig, grid, fig.add_axes(((fig_w - right + 0.12) / fig_w, bottom / fig_h, 0.12 / fig_w, row_h / fig_h))


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer, pil_kwargs={"compress_level": 3})  # zlib 6 costs 2x, saves ~10 %
    return buffer.getvalue()


def _entropy_panel(
    ax: Axes,
    image: np.ndarray,
    entropy: np.ndarray,
    window: tuple[float, float],
    aspect: float,
    origin: Literal["lower", "upper"] = "lower",
) -> AxesImage:
    """Entropy in colour over the dimmed image (zero entropy shows the image: where it lies)."""
    lo, hi = window
    ax.imshow(
        image, cmap="gray", vmin=lo, vmax=lo + 2.5 * (hi - lo), origin=origin, aspect=aspect, interpolation="nearest"
    )  # dimmed: the colours stand out
    return ax.imshow(
        np.ma.masked_less_equal(entropy, 0.0),
        cmap="magma",
        vmin=0.0,
        vmax=1.0,
        origin=origin,
        aspect=aspect,
        interpolation="nearest",
    )


def preview_3d(image: np.ndarray, seg: np.ndarray, entropy: np.ndarray | None, affine: np.ndarray, title: str) -> bytes:
    """PNG bytes for a volume; arrays in nibabel order (X, Y, Z) on the input grid."""
    arrays = [image, seg] + ([entropy] if entropy is not None else [])
    ras, zooms = _to_ras(arrays, affine)
    image, seg = ras[0], ras[1]
    centre = _centre(seg)
    lo, hi = _window(image)
    names = ["image", "segmentation"] + (["vote entropy"] if entropy is not None else [])
    shape = image.shape
    sizes = [(shape[h] * zooms[h], shape[v] * zooms[v]) for _, _, (h, v) in _VIEWS]
    fig, grid, cax = _figure(sizes, names, title, colorbar=entropy is not None)
    for col, ((view, (right, up), (ax_h, ax_v)), img_s, seg_s) in enumerate(
        zip(_VIEWS, _slices(image, centre), _slices(seg, centre))
    ):
        aspect = zooms[ax_v] / zooms[ax_h]
        for row in (0, 1):
            grid[row][col].imshow(
                img_s, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest"
            )
        grid[1][col].imshow(_overlay(seg_s), origin="lower", aspect=aspect, interpolation="nearest")
        grid[0][col].set_title(f"{view} ({'xyz'[3 - ax_h - ax_v]} = {centre[3 - ax_h - ax_v]})", fontsize=8)
        grid[0][col].text(
            0.98, 0.5, right, transform=grid[0][col].transAxes, color="yellow", fontsize=8, ha="right", va="center"
        )
        grid[0][col].text(
            0.5, 0.98, up, transform=grid[0][col].transAxes, color="yellow", fontsize=8, ha="center", va="top"
        )
        if entropy is not None:
            shown = _entropy_panel(grid[2][col], img_s, _slices(ras[2], centre)[col], (lo, hi), aspect)
    if cax is not None:
        fig.colorbar(shown, cax=cax)
    return _png(fig)


def preview_2d(image: np.ndarray, seg: np.ndarray, entropy: np.ndarray | None, title: str) -> bytes:
    """PNG bytes for a 2D image (H, W, C) as read, with its (H, W) labels and entropy."""
    lo, hi = float(image.min()), float(image.max())
    shown_image = np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if shown_image.shape[-1] == 1:
        shown_image = shown_image[..., 0]
    cols = 3 if entropy is not None else 2
    h, w = seg.shape
    fig, grid, cax = _figure([(w, h)] * cols, [""], title, colorbar=entropy is not None)
    axes = grid[0]
    axes[0].imshow(shown_image, cmap="gray", interpolation="nearest")
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(shown_image, cmap="gray", interpolation="nearest")
    axes[1].imshow(_overlay(seg), interpolation="nearest")
    axes[1].set_title("segmentation", fontsize=8)
    if entropy is not None:
        gray = shown_image.mean(axis=-1) if shown_image.ndim == 3 else shown_image
        shown = _entropy_panel(axes[2], gray, entropy, (0.0, 1.0), 1.0, origin="upper")
        axes[2].set_title("vote entropy", fontsize=8)
        assert cax is not None
        fig.colorbar(shown, cax=cax)
    return _png(fig)
