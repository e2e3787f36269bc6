from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from ldseg.io.preprocess import (
    image2d_to_model_grid,
    image_to_model_grid,
    labels2d_to_model_grid,
    labels_to_input_grid,
    labels_to_model_grid,
    min_max_standardize,
    nearest_indices,
    probabilities2d_to_input_grid,
    probabilities_to_input_grid,
    resize_nearest,
    zoom_to,
)

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data"


def _smooth_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Two touching blobs along the first axis, classes 1 and 2."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    labels = np.zeros(shape, np.uint8)
    labels[((x + 0.4) ** 2 + y**2 + z**2) < 0.3] = 1
    labels[((x - 0.4) ** 2 + y**2 + z**2) < 0.3] = 2
    return labels


def _official_image(array_nib: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    vol = array_nib.transpose(2, 1, 0).astype(np.float32)
    vol = (vol - vol.min()) / np.max(vol - vol.min())
    factors = [g / s for g, s in zip(grid, vol.shape)]
    return ndimage.zoom(vol, factors, order=1, mode="nearest")


# --- 3D -------------------------------------------------------------------------------------


def test_image_transposes_and_standardizes() -> None:
    arr = np.random.default_rng(0).normal(size=(7, 5, 3)).astype(np.float32) * 50 + 100
    out = image_to_model_grid(arr, (3, 5, 7))  # same grid: no resampling
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, min_max_standardize(arr.transpose(2, 1, 0)))
    assert out.min() == 0.0 and out.max() == 1.0


def test_image_matches_official_zoom() -> None:
    arr = np.random.default_rng(1).integers(0, 300, size=(24, 13, 20)).astype(np.int16)
    grid = (16, 16, 32)
    out = image_to_model_grid(arr, grid)
    assert out.shape == grid and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_array_equal(out, _official_image(arr, grid))


def test_constant_image_is_refused() -> None:
    with pytest.raises(ValueError, match="constant"):
        image_to_model_grid(np.ones((4, 4, 4), np.float32), (4, 4, 4))


def test_labels_higher_class_wins() -> None:
    # Random labels: the two classes' resampled masks overlap in many voxels.
    label_nib = np.random.default_rng(5).integers(0, 3, size=(12, 10, 8)).astype(np.uint8)
    grid = (5, 7, 9)
    seg = label_nib.transpose(2, 1, 0)
    factors = [g / s for g, s in zip(grid, seg.shape)]
    m1 = ndimage.zoom(np.where(seg == 1, 1, 0), factors, order=1, mode="nearest")
    m2 = ndimage.zoom(np.where(seg == 2, 1, 0), factors, order=1, mode="nearest")
    both = (m1 > 0) & (m2 > 0)
    assert both.any(), "test needs an overlap to exercise the rule"

    out = labels_to_model_grid(label_nib, grid, num_classes=3)
    assert out.dtype == np.uint8 and out.shape == grid
    expected = np.where(m1 > 0, 1, 0)
    expected[m2 > 0] = 2  # the official code: seg2 > 0 overwrites seg1
    np.testing.assert_array_equal(out, expected)
    assert np.all(out[both] == 2)


def test_label_masks_round_half_away_from_zero() -> None:
    # Masks are zoomed as integers: an interpolated 0.5 rounds to 1, so the voxel joins the class.
    label_nib = np.array([0, 1], np.uint8).reshape(1, 1, 2)  # model order (2, 1, 1)
    out = labels_to_model_grid(label_nib, (3, 1, 1), num_classes=2)
    np.testing.assert_array_equal(out.ravel(), [0, 1, 1])


@pytest.mark.parametrize(
    ("input_shape_nib", "grid"),
    [((120, 52, 80), (64, 64, 128)), ((37, 101, 13), (16, 32, 8)), ((5, 3, 2), (8, 8, 8))],
)
def test_probabilities_back_to_input_grid(input_shape_nib: tuple[int, int, int], grid: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(2)
    probs = rng.random((3, *grid), dtype=np.float32)
    probs /= probs.sum(axis=0, keepdims=True)
    labels = probabilities_to_input_grid(probs, input_shape_nib)
    assert labels.shape == input_shape_nib and labels.dtype == np.uint8
    # Same as zooming every class and taking argmax (the running maximum is only for memory).
    target = input_shape_nib[::-1]
    stacked = np.stack([zoom_to(p, target) for p in probs])
    np.testing.assert_array_equal(labels, np.argmax(stacked, axis=0).transpose(2, 1, 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probabilities_back_to_input_grid_on_smooth_maps_with_ties(seed: int) -> None:
    """The boundary-only interpolation equals the definition (every class zoomed, argmax) on maps like
    a model's: large uniform regions, boundaries, exact ties and classes a float32 ulp apart."""
    rng = np.random.default_rng(seed)
    grid, input_shape_nib = (32, 32, 64), (60, 26, 40)  # knee-like ratios: up and down per axis
    logits = ndimage.gaussian_filter(rng.standard_normal((3, *grid)), sigma=(0, 3, 3, 3)) * 40
    probs = np.exp(logits - logits.max(axis=0))
    probs = (probs / probs.sum(axis=0)).astype(np.float32)
    probs[1, :8] = probs[2, :8]  # exact ties between classes 1 and 2
    probs[0, 8:16] = np.nextafter(probs[1, 8:16], np.float32(0))  # a float32 ulp below class 1
    labels = probabilities_to_input_grid(probs, input_shape_nib)
    target = input_shape_nib[::-1]
    stacked = np.stack([zoom_to(p, target) for p in probs])
    expected = np.argmax(stacked, axis=0).transpose(2, 1, 0)
    assert len(np.unique(expected)) == 3
    np.testing.assert_array_equal(labels, expected)


def test_round_trip_model_grid_and_back() -> None:
    label_nib = _smooth_labels((30, 22, 18))
    grid = (16, 16, 32)
    model = labels_to_model_grid(label_nib, grid, num_classes=3)
    onehot = np.eye(3, dtype=np.float32)[model].transpose(3, 0, 1, 2)
    back = probabilities_to_input_grid(onehot, label_nib.shape)
    via_labels = labels_to_input_grid(model, label_nib.shape, num_classes=3)
    for out in (back, via_labels):
        assert out.shape == label_nib.shape
        for c in (1, 2):
            a, b = out == c, label_nib == c
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            assert dice > 0.85, (c, dice)


def test_labels_to_input_grid_identity_on_same_grid() -> None:
    label_nib = _smooth_labels((9, 8, 7))
    model = labels_to_model_grid(label_nib, (7, 8, 9), num_classes=3)
    np.testing.assert_array_equal(model, label_nib.transpose(2, 1, 0))
    np.testing.assert_array_equal(labels_to_input_grid(model, (9, 8, 7), 3), label_nib)


@settings(max_examples=60, deadline=None)
@given(
    src=st.tuples(*[st.integers(1, 300)] * 3),
    dst=st.tuples(*[st.integers(1, 300)] * 3),
)
def test_zoom_to_hits_the_exact_shape(src: tuple[int, int, int], dst: tuple[int, int, int]) -> None:
    # Only the shape arithmetic matters here; keep the arrays tiny along all but one axis.
    for axis in range(3):
        s = tuple(src[axis] if k == axis else 1 for k in range(3))
        d = tuple(dst[axis] if k == axis else 1 for k in range(3))
        assert zoom_to(np.zeros(s, np.float32), d).shape == d


# --- 2D -------------------------------------------------------------------------------------


def test_nearest_indices_floor_rule() -> None:
    for src in range(1, 80):
        for dst in range(1, 80):
            idx = nearest_indices(src, dst)
            x = np.arange(dst)
            exact = np.minimum(x * src // dst, src - 1)
            # Off exact integers the float product floors like the exact rule...
            off_integer = (x * src) % dst != 0
            np.testing.assert_array_equal(idx[off_integer], exact[off_integer])
            # ...and at them OpenCV's double arithmetic can land one below.
            assert np.all((idx == exact) | (idx == exact - 1))


def test_nearest_indices_match_opencv_quirks() -> None:
    # Values produced by cv2.resize(..., INTER_NEAREST) (OpenCV 4.14): 1/(dst/src) in double
    # makes x * ifx fall just short of an integer.
    assert nearest_indices(2, 98)[49] == 0  # exact floor(49 * 2 / 98) would be 1
    assert nearest_indices(6, 34)[17] == 2  # exact floor(17 * 6 / 34) would be 3
    np.testing.assert_array_equal(nearest_indices(3, 147)[[48, 49, 97, 98]], [0, 0, 1, 1])
    np.testing.assert_array_equal(nearest_indices(522, 512)[:4], [0, 1, 2, 3])
    np.testing.assert_array_equal(nearest_indices(10, 4), [0, 2, 5, 7])


def test_resize_nearest_picks_rows_and_columns() -> None:
    img = np.arange(6 * 9 * 3).reshape(6, 9, 3)
    out = resize_nearest(img, (4, 5))
    assert out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out, img[nearest_indices(6, 4)][:, nearest_indices(9, 5)])


def test_image2d_resize_then_standardize_channels_first() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, size=(50, 70, 3)).astype(np.float32)
    out = image2d_to_model_grid(rgb, (32, 32))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    expected = min_max_standardize(resize_nearest(rgb, (32, 32))).transpose(2, 0, 1)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(image_to_model_grid(rgb, (32, 32)), out)


def test_labels2d_binarized_and_back() -> None:
    ids = np.zeros((40, 60), np.uint8)
    ids[5:20, 10:30] = 3
    ids[25:35, 40:55] = 7
    model = labels2d_to_model_grid(ids, (16, 16))
    assert model.dtype == np.uint8 and set(np.unique(model)) == {0, 1}
    probs = np.stack([1.0 - model, model]).astype(np.float32)
    back = probabilities2d_to_input_grid(probs, (40, 60))
    assert back.shape == (40, 60) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, resize_nearest(model, (40, 60)))


# --- real data (../shared/data) -------------------------------------------------------------

needs_knee = pytest.mark.skipif(not (SHARED / "knee").is_dir(), reason=f"reference data not found at {SHARED / 'knee'}")
needs_glas = pytest.mark.skipif(not (SHARED / "glas").is_dir(), reason=f"reference data not found at {SHARED / 'glas'}")
GOLDEN = SHARED / "official-keras-weights"


@pytest.mark.shared
@needs_knee
def test_knee_case1_model_grid() -> None:
    from ldseg.io.nifti import read_label_volume, read_volume

    volume = read_volume(SHARED / "knee/images/case1.nii.gz")
    image = image_to_model_grid(volume.array, (128, 128, 256))
    assert image.shape == (128, 128, 256) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    labels = labels_to_model_grid(read_label_volume(SHARED / "knee/labels/case1.nii.gz").array, (128, 128, 256), 3)
    assert set(np.unique(labels)) == {0, 1, 2}
    golden_path = GOLDEN / "golden_knee3d.npz"
    if golden_path.is_file():  # the official pipeline's own preprocessing of case 1
        with np.load(golden_path) as golden:
            # stored as float16: ours rounds to exactly the same values
            np.testing.assert_array_equal(image.astype(np.float16), golden["image"][0, ..., 0])
            np.testing.assert_array_equal(labels, golden["label"][0])


@pytest.mark.shared
@needs_glas
def test_glas_case1_model_grid() -> None:
    from ldseg.io.image2d import read_image2d, read_label2d

    image = image2d_to_model_grid(read_image2d(SHARED / "glas/images/case1.bmp").array, (512, 512))
    labels = labels2d_to_model_grid(read_label2d(SHARED / "glas/labels/case1.bmp"), (512, 512))
    assert image.shape == (3, 512, 512) and labels.shape == (512, 512)
    golden_path = GOLDEN / "golden_glas2d.npz"
    if golden_path.is_file():
        with np.load(golden_path) as golden:
            np.testing.assert_array_equal(image.transpose(1, 2, 0), golden["image"][0])
            np.testing.assert_array_equal(labels, golden["label"][0, ..., 0])
