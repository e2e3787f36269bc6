"""Preview pictures (ldseg/qc/preview.py): slice choice, orientation, PNG output."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ldseg.qc.preview import _centre, _to_ras, preview_2d, preview_3d


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def test_slices_cut_the_structures_not_the_gap_between_them():
    seg = np.zeros((20, 20, 60), dtype=np.uint8)
    seg[5:15, 5:15, 5:20] = 1  # two structures stacked along z: centre of mass at z = 29.5, empty
    seg[5:15, 5:15, 40:55] = 2
    x, y, z = _centre(seg)
    assert x in (9, 10) and y in (9, 10)
    assert seg[:, :, z].any(), f"axial slice z={z} cuts no structure"
    assert z in (19, 40)  # the nearest slices to the centre that cut a structure
    assert _centre(np.zeros((4, 6, 8), dtype=np.uint8)) == (2, 3, 4)


def test_reorientation_to_ras_moves_a_marker_and_its_spacing():
    # LPS axes, y and z swapped (x: L, z-axis of the array: P, y-axis: S), spacing 1, 2, 3 mm
    affine = np.array([[-1.0, 0, 0, 0], [0, 0, -3.0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    volume = np.zeros((4, 5, 6))
    volume[0, 1, 2] = 1.0  # x index 0 = most right (x increases to the left)
    (ras,), zooms = _to_ras([volume], affine)
    assert ras.shape == (4, 6, 5)
    np.testing.assert_allclose(zooms, [1.0, 3.0, 2.0])
    # R: flipped x -> 3; A: array axis 2 (P) flipped -> 6-1-2 = 3; S: array axis 1 -> 1
    assert np.argwhere(ras == 1.0).tolist() == [[3, 3, 1]]


def test_preview_3d_adds_an_entropy_row():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 30, 20)).astype(np.float32)
    seg = np.zeros(image.shape, dtype=np.uint8)
    seg[10:30, 5:25, 5:15] = 1
    seg[15:20, 10:20, 8:12] = 2
    without = _png_size(preview_3d(image, seg, None, np.eye(4), "t"))
    entropy = rng.uniform(size=image.shape).astype(np.float32)
    with_entropy = _png_size(preview_3d(image, seg, entropy, np.eye(4), "t"))
    assert with_entropy[0] == without[0] and with_entropy[1] > without[1] * 1.3


def test_preview_2d_rgb_image():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(48, 64, 3)).astype(np.float32)
    seg = np.zeros((48, 64), dtype=np.uint8)
    seg[10:30, 20:40] = 1
    two = _png_size(preview_2d(image, seg, None, "t"))
    three = _png_size(preview_2d(image, seg, np.zeros((48, 64), np.float32), "t"))
    assert three[0] / three[1] > two[0] / two[1] * 1.2  # a third panel in the row
