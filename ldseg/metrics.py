"""Segmentation metrics shared by the CLI, training, export validation and benchmarks."""

from __future__ import annotations

import numpy as np


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of each foreground class (1..K-1); 1.0 where a class is absent from both."""
    scores = {}
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        denom = int(p.sum()) + int(t.sum())
        scores[c] = 1.0 if denom == 0 else float(2 * np.logical_and(p, t).sum() / denom)
    return scores


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of identical voxels."""
    return float((a == b).mean())
