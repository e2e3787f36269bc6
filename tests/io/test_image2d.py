from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldseg.errors import InputError, OutputError
from ldseg.io.image2d import Image2D, read_image2d, read_label2d, write_label2d


def _rgb(seed: int = 0, shape: tuple[int, int] = (21, 34)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_read_rgb(tmp_path: Path, suffix: str) -> None:
    rgb = _rgb()
    path = tmp_path / f"img{suffix}"
    Image.fromarray(rgb).save(path)
    img = read_image2d(path)
    assert isinstance(img, Image2D) and img.path == path
    assert img.array.dtype == np.float32 and img.array.shape == (21, 34, 3)
    np.testing.assert_array_equal(img.array, rgb.astype(np.float32))


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    gray = _rgb()[..., 0]
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    img = read_image2d(path)
    assert img.array.shape == (21, 34, 3)
    for c in range(3):
        np.testing.assert_array_equal(img.array[..., c], gray)


def _truncated_png(tmp_path: Path) -> Path:
    path = tmp_path / "cut.png"
    Image.fromarray(_rgb(1, (64, 64))).save(path)
    path.write_bytes(path.read_bytes()[:-3000])
    return path


def _truncated_bmp(tmp_path: Path) -> Path:
    path = tmp_path / "cut.bmp"
    Image.fromarray(_rgb(1, (64, 64))).save(path)
    path.write_bytes(path.read_bytes()[:5000])
    return path


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "junk.png"
    path.write_bytes(b"not an image at all" * 20)
    return path


def _rgba(tmp_path: Path) -> Path:
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([_rgb(), np.full((21, 34), 255, np.uint8)])).save(path)
    return path


def _constant(tmp_path: Path) -> Path:
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)
    return path


BAD_IMAGES = {
    "missing": (lambda p: p / "missing.png", "no such file"),
    "directory": (lambda p: p, "directory"),
    "garbage": (_garbage, "not a readable image"),
    "truncated png": (_truncated_png, "not a readable image"),
    "truncated bmp": (_truncated_bmp, "not a readable image"),
    "rgba": (_rgba, "unsupported image mode RGBA"),
    "constant": (_constant, "constant image"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_one_line_input_error(tmp_path: Path, case: str) -> None:
    make, expected = BAD_IMAGES[case]
    path = make(tmp_path)
    with pytest.raises(InputError, match=expected) as info:
        read_image2d(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_label_ids(tmp_path: Path) -> None:
    ids = np.zeros((10, 12), np.uint8)
    ids[2:5, 3:7] = 1
    ids[6:9, 1:4] = 17
    path = tmp_path / "lab.bmp"
    Image.fromarray(ids).save(path)
    np.testing.assert_array_equal(read_label2d(path), ids)

    palette = Image.fromarray(ids).convert("P")
    palette.save(tmp_path / "lab_p.png")
    assert read_label2d(tmp_path / "lab_p.png").shape == (10, 12)

    wide = ids.astype(np.uint16) * 1000
    Image.fromarray(wide).save(tmp_path / "lab16.png")
    out = read_label2d(tmp_path / "lab16.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, wide)


def test_label_rgb_refused(tmp_path: Path) -> None:
    path = tmp_path / "rgb_label.png"
    Image.fromarray(_rgb()).save(path)
    with pytest.raises(InputError, match="unsupported label mode RGB"):
        read_label2d(path)


def test_write_label2d_round_trip(tmp_path: Path) -> None:
    labels = np.random.default_rng(4).integers(0, 2, size=(15, 9)).astype(np.uint8)
    out = tmp_path / "seg.png"
    write_label2d(out, labels, overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.png"]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "L"
    np.testing.assert_array_equal(read_label2d(out), labels)
    with pytest.raises(OutputError, match="exists"):
        write_label2d(out, labels, overwrite=False)
    write_label2d(out, 1 - labels, overwrite=True)
    np.testing.assert_array_equal(read_label2d(out), 1 - labels)


def test_write_label2d_rejects_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"\.png"):
        write_label2d(tmp_path / "seg.bmp", np.zeros((4, 4), np.uint8), overwrite=False)
    with pytest.raises(ValueError, match="0..255"):
        write_label2d(tmp_path / "seg.png", np.full((4, 4), 300), overwrite=False)
    with pytest.raises(ValueError, match="H, W"):
        write_label2d(tmp_path / "seg.png", np.zeros((4, 4, 3), np.uint8), overwrite=False)
    assert list(tmp_path.iterdir()) == []
