"""The accuracy columns of ldseg-bench, reported only where they can disagree.

- Agreement and Dice against the reference (torch FP32 eager, same inputs) are given for the other
  rows only, and only when the model is trained and the reference output holds at least two classes
  each covering >= 1 % of the voxels. Otherwise a note says why there is no number: a model that
  labels (nearly) every voxel alike agrees with anything of the same kind.
- With `--data DIR` holding `images/` and `labels/` (one label per image, same file name), every
  row, the reference included, also gets its Dice against those labels on the input's own grid. It
  scores what `ldseg-run` would write for that input and seed: one extra, untimed run asks the
  backend for probabilities, which go back to the input grid as in ldseg-run (linear resampling,
  then argmax). Mapping the labels back instead (nearest or per class) moved the demo model's Dice
  on a small off-grid phantom by 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldseg.errors import InputError
from ldseg.io.image2d import read_label2d
from ldseg.io.nifti import read_label_volume
from ldseg.metrics import agreement, dice_per_class
from ldseg.model.config import ModelConfig
from ldseg.runs.volumes import Prepared, is_input_file, stem, to_input_grid

MIN_CLASS_FRACTION = 0.01
REFERENCE_NOTE = "reference"
RANDOM_WEIGHTS_NOTE = "random weights: agreement not meaningful"
ONE_CLASS_NOTE = "reference output is one class: agreement not meaningful"


def class_fractions(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Fraction of the voxels in each class 0..K-1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=num_classes)
    return {str(c): float(n) / labels.size for c, n in enumerate(counts.tolist())}


def informative(fractions: dict[str, float], min_fraction: float = MIN_CLASS_FRACTION) -> bool:
    """At least two classes each cover `min_fraction` of the voxels."""
    return sum(f >= min_fraction for f in fractions.values()) >= 2


def untrained_note(trained: dict[str, bool]) -> str | None:
    """Why agreement means nothing for this model's weights, or None if every component is trained."""
    missing = [name for name, done in trained.items() if not done]
    if not missing:
        return None
    if len(missing) == len(trained):
        return RANDOM_WEIGHTS_NOTE
    return f"untrained {', '.join(missing)} (random weights): agreement not meaningful"


@dataclass(frozen=True)
class TruthCase:
    """A ground-truth label map on its input's grid (nibabel order for 3D, (H, W) for 2D)."""

    file: str
    labels: np.ndarray
    prepared: Prepared  # its image, with the geometry to map results back


def truth_folders(data: Path) -> tuple[Path, Path | None]:
    """(images folder, labels folder or None): DIR/images + DIR/labels, or DIR itself without labels."""
    images = data / "images"
    if not images.is_dir():
        return data, None
    labels = data / "labels"
    return images, labels if labels.is_dir() else None


def _label_file(folder: Path, image: Path) -> Path:
    same = folder / image.name
    if same.is_file():
        return same
    matches = sorted(p for p in folder.iterdir() if p.is_file() and is_input_file(p) and stem(p) == stem(image))
    if not matches:
        raise InputError(f"{folder}: no label for {image.name} (--data DIR/labels needs one per image, same name)")
    return matches[0]


def load_truth(cfg: ModelConfig, labels_dir: Path, prepared: list[Prepared]) -> list[TruthCase]:
    """The label of each prepared input, checked against the input's grid and the model's classes."""
    cases: dict[Path, TruthCase] = {}
    out = []
    for item in prepared:
        if item.path not in cases:
            path = _label_file(labels_dir, item.path)
            if cfg.spatial_dims == 3:
                labels = read_label_volume(path).array
            else:
                labels = (read_label2d(path) > 0).astype(np.uint8)  # instance ids -> foreground, as the official 2D
            if tuple(labels.shape) != item.input_shape:
                raise InputError(f"{path}: label shape {labels.shape} differs from its image's {item.input_shape}")
            if int(labels.max()) >= cfg.num_classes:
                raise InputError(
                    f"{path}: label values up to {int(labels.max())}, the model has {cfg.num_classes} classes"
                )
            cases[item.path] = TruthCase(path.name, labels, item)
        out.append(cases[item.path])
    return out


def dice_vs_truth(probabilities: np.ndarray, truth: list[TruthCase], cfg: ModelConfig) -> dict[str, Any]:
    """Dice per class of each batch item (probabilities (B, K, *grid) on the model grid, mapped to
    the input grid as ldseg-run does) against its truth; `dice` is the mean over the batch items."""
    per_case: list[dict[str, float]] = []
    for k, case in enumerate(truth[: probabilities.shape[0]]):
        pred = to_input_grid(case.prepared, probabilities[k])
        per_case.append({str(c): d for c, d in dice_per_class(pred, case.labels, cfg.num_classes).items()})
    mean = {c: float(np.mean([scores[c] for scores in per_case])) for c in per_case[0]}
    cases = [{"file": case.file, "dice": scores} for case, scores in zip(truth, per_case)]
    return {"dice": mean, "mean_dice": float(np.mean(list(mean.values()))), "cases": cases}


def row_accuracy(
    labels: np.ndarray,
    ref_labels: np.ndarray,
    cfg: ModelConfig,
    *,
    is_reference: bool,
    weights_note: str | None,
    vs_truth: dict[str, Any] | None,
) -> dict[str, Any]:
    """The row's `accuracy` block (schema in benchmarks/README.md); `vs_truth` from dice_vs_truth."""
    fractions = class_fractions(ref_labels, cfg.num_classes)
    note = REFERENCE_NOTE if is_reference else weights_note or (None if informative(fractions) else ONE_CLASS_NOTE)
    block: dict[str, Any] = {
        "agreement": None,
        "dice": None,
        "mean_dice": None,
        "note": note,
        "reference_class_fractions": fractions,
    }
    if note is None:
        dice = dice_per_class(labels, ref_labels, cfg.num_classes)
        block.update(
            agreement=agreement(labels, ref_labels),
            dice={str(c): d for c, d in dice.items()},
            mean_dice=float(np.mean(list(dice.values()))),
        )
    block["vs_truth"] = vs_truth
    return block
