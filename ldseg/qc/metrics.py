"""Per-volume QC numbers: class sizes, connected components, vote uncertainty, Dice.

Sizes, components and Dice are counted on the input grid (the written `_seg`, where a voxel has a
physical size). The uncertainty numbers are counted on the model grid, where the K samples voted:
no interpolation blurs them, and a voxel on which all K samples agree has entropy exactly 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ldseg.metrics import dice_per_class
from ldseg.runtime.samples import vote_entropy

LOW_CONFIDENCE = 0.75  # a structure voxel is "unsure" when fewer than 75 % of the K votes agree
QC_FORMAT = "ldseg-qc/1"


@dataclass
class ClassQC:
    name: str
    voxels: int
    volume_mm3: float | None  # None for 2D images (pixels have no physical size)
    components: int
    dice: float | None = None  # with a reference label


@dataclass
class VolumeQC:
    """One volume's QC record: what `<name>_qc.json` holds and the report shows."""

    name: str
    input: str
    shape: list[int]
    samples: int
    classes: dict[str, ClassQC]  # keyed by class index ("1", "2", ...), foreground only
    mean_structure_entropy: float | None = None  # K >= 2 and a non-empty structure
    low_confidence_fraction: float | None = None  # of structure voxels, vote confidence < 0.75
    label: str | None = None  # reference label used for Dice
    preview: str | None = None  # file name of the preview PNG, beside the sidecar
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": QC_FORMAT, **asdict(self)}, indent=2, allow_nan=False) + "\n"

    @staticmethod
    def from_dict(data: dict[str, Any]) -> VolumeQC:
        data = {k: v for k, v in data.items() if k != "format"}
        classes = {k: ClassQC(**v) for k, v in data.pop("classes").items()}
        return VolumeQC(classes=classes, **data)


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel: |det| of the affine's 3x3 part (shears and obliques included)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def count_components(mask: np.ndarray) -> int:
    """Connected components of a boolean mask, full connectivity (26 in 3D, 8 in 2D): voxels that
    touch only at an edge or corner belong to one structure, as a reader would see them."""
    if not mask.any():
        return 0
    _, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    return int(count)


def class_stats(
    seg: np.ndarray,
    names: list[str],
    voxel_mm3: float | None,
    truth: np.ndarray | None = None,
) -> dict[str, ClassQC]:
    """Size, components (and Dice with `truth`, same grid) of every foreground class in `seg`."""
    num_classes = len(names)
    dice = dice_per_class(seg, truth, num_classes) if truth is not None else {}
    counts = np.bincount(seg.ravel(), minlength=num_classes)
    stats = {}
    for c in range(1, num_classes):
        voxels = int(counts[c])
        stats[str(c)] = ClassQC(
            name=names[c],
            voxels=voxels,
            volume_mm3=None if voxel_mm3 is None else voxels * voxel_mm3,
            components=count_components(seg == c),
            dice=dice.get(c),
        )
    return stats


def uncertainty_stats(votes: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float | None, float | None]:
    """(mean vote entropy, fraction with vote confidence < LOW_CONFIDENCE) over the predicted
    structures' union (`labels` > 0). `votes` (K, *grid) are the K samples' labels, `labels` the
    final segmentation on the same grid. Vote confidence of a voxel = share of the K votes equal
    to its final label. None for K < 2 or an empty segmentation."""
    if votes.shape[0] < 2:
        return None, None
    structure = labels > 0
    n = int(structure.sum())
    if n == 0:
        return None, None
    entropy = vote_entropy(votes[:, structure], num_classes)
    confidence = (votes[:, structure] == labels[structure]).mean(axis=0)
    return float(entropy.mean()), float((confidence < LOW_CONFIDENCE).sum() / n)
