"""QC for each volume of a run: the session's VolumeExtras for `--preview`, `--qc` and `--labels`.

run_files plans these files with the volume's maps and writes them with the maps, all or nothing;
they come back from here as bytes. A reference label is read and checked before the model runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldseg.io.image2d import Image2D
from ldseg.model.config import ModelConfig
from ldseg.qc.classes import class_names
from ldseg.qc.metrics import VolumeQC, class_stats, uncertainty_stats, voxel_volume_mm3
from ldseg.runs.types import ExtraFiles, Segmentation
from ldseg.runs.volumes import Prepared, read_reference_labels, stem
from ldseg.runtime.samples import host

PREVIEW = "_preview"
QC = "_qc"
_EXTENSIONS = {PREVIEW: ".png", QC: ".json"}


@dataclass(frozen=True)
class Reference:
    """A reference label for Dice, on the input's grid (`labels` None: DIR has no such file)."""

    path: Path
    labels: np.ndarray | None = None


def read_reference(prepared: Prepared, cfg: ModelConfig, labels_dir: Path) -> Reference:
    """`labels_dir / <input file name>`, checked against the input before anything is computed."""
    path = labels_dir / prepared.path.name
    if not path.exists():
        return Reference(path)
    labels = read_reference_labels(path, prepared, cfg)
    return Reference(path, labels)


@dataclass(frozen=True)
class QcExtras:
    """Preview picture and/or QC sidecar per volume (runtime.session.VolumeExtras)."""

    cfg: ModelConfig
    samples: int
    preview: bool = False
    qc: bool = False
    labels: Path | None = None  # reference labels named as the inputs: Dice (implies qc)

    def targets(self, out_dir: Path, input_path: Path) -> dict[str, Path]:
        suffixes = ([PREVIEW] if self.preview else []) + ([QC] if self.qc or self.labels is not None else [])
        return {s: out_dir / f"{stem(input_path)}{s}{_EXTENSIONS[s]}" for s in suffixes}

    def start(self, prepared: Prepared) -> Callable[[Segmentation, dict[str, Path]], ExtraFiles]:
        reference = read_reference(prepared, self.cfg, self.labels) if self.labels is not None else None
        return lambda result, targets: self._files(prepared, result, targets, reference)

    def _files(
        self, prepared: Prepared, result: Segmentation, targets: dict[str, Path], reference: Reference | None
    ) -> ExtraFiles:
        out = ExtraFiles()
        seg = result.outputs["_seg"][0]
        entropy = result.outputs["_entropy"][0] if "_entropy" in result.outputs else None
        name = stem(prepared.path)
        if PREVIEW in targets:
            from ldseg.qc.preview import preview_2d, preview_3d  # matplotlib: only when asked

            clock = time.perf_counter()
            title = f"{name}  (K = {self.samples})"
            if isinstance(prepared.reference, Image2D):
                out.contents[PREVIEW] = preview_2d(prepared.reference.array, seg, entropy, title)
            else:
                out.contents[PREVIEW] = preview_3d(
                    prepared.reference.array, seg, entropy, prepared.reference.affine, title
                )
            out.stage_ms["preview"] = (time.perf_counter() - clock) * 1e3
        if QC in targets:
            clock = time.perf_counter()
            out.record = self._record(prepared, result, seg, reference, targets)
            out.contents[QC] = out.record.to_json().encode()
            out.stage_ms["qc"] = (time.perf_counter() - clock) * 1e3
        return out

    def _record(
        self,
        prepared: Prepared,
        result: Segmentation,
        seg: np.ndarray,
        reference: Reference | None,
        targets: dict[str, Path],
    ) -> VolumeQC:
        source = prepared.reference
        voxel_mm3 = None if isinstance(source, Image2D) else voxel_volume_mm3(source.affine)
        truth = reference.labels if reference is not None else None
        mean_entropy, low_confidence = uncertainty_stats(
            host(result.votes), host(result.mean_probabilities).argmax(axis=0), self.cfg.num_classes
        )
        record = VolumeQC(
            name=stem(prepared.path),
            input=str(prepared.path),
            shape=list(prepared.input_shape),
            samples=self.samples,
            classes=class_stats(seg, class_names(self.cfg), voxel_mm3, truth),
            mean_structure_entropy=mean_entropy,
            low_confidence_fraction=low_confidence,
            label=str(reference.path) if reference is not None and truth is not None else None,
            preview=targets[PREVIEW].name if PREVIEW in targets else None,
        )
        if reference is not None and truth is None:
            record.extra["label_missing"] = str(reference.path)
        return record
