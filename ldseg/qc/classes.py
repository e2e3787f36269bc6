"""Class names and colours, in one place (the overlay, the report and the sidecars agree)."""

from __future__ import annotations

from matplotlib import colormaps

from ldseg.model.config import ModelConfig


def class_names(cfg: ModelConfig) -> list[str]:
    """Names of classes 0..K-1: the checkpoint's (ModelConfig.names, as DICOM SEG labels them)."""
    return list(cfg.names)


def class_color(index: int) -> tuple[float, float, float]:
    """RGB in [0, 1] for a foreground class: matplotlib's tab10, class 1 first (0 is never drawn)."""
    r, g, b, _ = colormaps["tab10"]((index - 1) % 10)
    return (float(r), float(g), float(b))


def class_color_hex(index: int) -> str:
    return "#" + "".join(f"{round(255 * v):02x}" for v in class_color(index))
