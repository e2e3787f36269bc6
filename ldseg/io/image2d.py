"""2D images (GlaS histology) in and out through Pillow.

Every problem with an input becomes one InputError line naming the file. Pillow decodes
lazily, so truncated files only fail at `load()`, which is called inside the guard.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldseg.errors import InputError, OutputError
from ldseg.io.atomic import atomic_write

# What Pillow raises on unreadable, truncated, corrupt or absurdly large files.
_READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)
_IMAGE_MODES = frozenset({"RGB", "L", "1"})  # grayscale is replicated to RGB
_LABEL_MODES = frozenset({"L", "P", "1", "I", "I;16", "I;16L", "I;16B"})  # single-channel ids


@dataclass(frozen=True)
class Image2D:
    """An (H, W, C) float32 image (RGB, values as stored, e.g. 0..255) and where it came from."""

    array: np.ndarray
    path: Path


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _open(path: Path, modes: frozenset[str], what: str) -> Image.Image:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an image file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in modes:
                raise InputError(f"{path}: unsupported {what} mode {im.mode} (expected one of {sorted(modes)})")
            # copy() detaches the pixels from the file handle closed on leaving the block
            return im.copy()
    except InputError:
        raise
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: not a readable image ({_one_line(exc)})") from exc


def read_image2d(path: Path) -> Image2D:
    """Read an RGB or grayscale image as (H, W, 3) float32; InputError for anything unusable."""
    path = Path(path)
    im = _open(path, _IMAGE_MODES, "image")
    array = np.asarray(im.convert("RGB"), dtype=np.float32)
    if array.size == 0:
        raise InputError(f"{path}: empty image")
    if array.min() == array.max():
        raise InputError(
            f"{path}: constant image (every pixel is {array.min():g}); min-max standardization needs contrast"
        )
    return Image2D(array=array, path=path)


def read_label2d(path: Path) -> np.ndarray:
    """Read a single-channel label image (instance ids) as (H, W) unsigned integers."""
    path = Path(path)
    im = _open(path, _LABEL_MODES, "label")
    ids = np.asarray(im)
    if ids.size == 0:
        raise InputError(f"{path}: empty label image")
    if ids.dtype == bool:
        return ids.astype(np.uint8)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise InputError(f"{path}: label image has negative ids (min {lo})")
    return ids.astype(np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32)


def write_label2d(path: Path, labels: np.ndarray, overwrite: bool, description: str | None = None) -> None:
    """Write (H, W) labels (0..255) as an 8-bit grayscale PNG, atomically; `description` (e.g. the
    precision it ran at) goes into a tEXt chunk "ldseg"."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputError(f"{path}: output name must end in .png")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected (H, W) labels, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must be within 0..255 to be stored as 8-bit PNG")
    im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))  # uint8 2D -> mode L

    info = PngInfo()
    if description is not None:
        info.add_text("ldseg", description)

    def write(tmp: Path) -> None:
        im.save(tmp, format="PNG", pnginfo=info)

    atomic_write(path, write, overwrite)
