"""QC for one volume of a run: which files it adds, its reference label, and their contents.

run_files calls in here only when a run asks for `--preview`, `--qc`, `--labels` or `--report`;
the files come back as bytes so the session writes them with the volume's maps, all or nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldseg.errors import InputError
from ldseg.io.atomic import atomic_write
from ldseg.io.image2d import Image2D, read_label2d
from ldseg.io.nifti import read_label_volume
from ldseg.model.config import ModelConfig
from ldseg.qc.classes import class_names
from ldseg.qc.metrics import VolumeQC, class_stats, uncertainty_stats, voxel_volume_mm3
from ldseg.runtime.session import RunOptions, Segmentation
from ldseg.runtime.volumes import Prepared, stem

PREVIEW = "_preview"
QC = "_qc"
_EXTENSIONS = {PREVIEW: ".png", QC: ".json"}


def wants_qc(opts: RunOptions) -> bool:
    return opts.qc or opts.labels is not None


def qc_targets(out_dir: Path, input_path: Path, opts: RunOptions) -> dict[str, Path]:
    """The extra files this run writes for `input_path` (known before it is read)."""
    suffixes = ([PREVIEW] if opts.preview else []) + ([QC] if wants_qc(opts) else [])
    return {s: out_dir / f"{stem(input_path)}{s}{_EXTENSIONS[s]}" for s in suffixes}


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
    if isinstance(prepared.reference, Image2D):
        labels = read_label2d(path)
        if cfg.num_classes == 2:
            labels = (labels > 0).astype(np.uint8)  # instance ids, binarized as the official pipeline
    else:
        labels = read_label_volume(path).array
    if labels.shape != prepared.input_shape:
        raise InputError(f"{path}: label of shape {labels.shape}, its image {prepared.path.name} "
                         f"has shape {prepared.input_shape}")
    if labels.max() >= cfg.num_classes:
        raise InputError(f"{path}: label values up to {labels.max()}, the model has classes "
                         f"0..{cfg.num_classes - 1}")
    return Reference(path, labels)


@dataclass
class VolumeFiles:
    contents: dict[str, bytes] = field(default_factory=dict)  # {suffix: file content}
    record: VolumeQC | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)


def volume_files(
    prepared: Prepared,
    result: Segmentation,
    cfg: ModelConfig,
    opts: RunOptions,
    targets: dict[str, Path],
    reference: Reference | None,
) -> VolumeFiles:
    """The preview PNG and the QC sidecar of one segmented volume, as asked by `opts`."""
    out = VolumeFiles()
    seg = result.outputs["_seg"][0]
    entropy = result.outputs["_entropy"][0] if "_entropy" in result.outputs else None
    name = stem(prepared.path)
    if opts.preview:
        from ldseg.qc.preview import preview_2d, preview_3d  # matplotlib: only when asked

        clock = time.perf_counter()
        title = f"{name}  (K = {opts.samples})"
        if isinstance(prepared.reference, Image2D):
            png = preview_2d(prepared.reference.array, seg, entropy, title)
        else:
            png = preview_3d(prepared.reference.array, seg, entropy, prepared.reference.affine, title)
        out.contents[PREVIEW] = png
        out.stage_ms["preview"] = (time.perf_counter() - clock) * 1e3
    if QC in targets:
        clock = time.perf_counter()
        is_2d = isinstance(prepared.reference, Image2D)
        voxel_mm3 = None if is_2d else voxel_volume_mm3(prepared.reference.affine)  # type: ignore[union-attr]
        truth = reference.labels if reference is not None else None
        mean_entropy, low_confidence = uncertainty_stats(
            result.votes, result.mean_probabilities.argmax(axis=0), cfg.num_classes
        )
        out.record = VolumeQC(
            name=name,
            input=str(prepared.path),
            shape=list(prepared.input_shape),
            samples=opts.samples,
            classes=class_stats(seg, class_names(cfg), voxel_mm3, truth),
            mean_structure_entropy=mean_entropy,
            low_confidence_fraction=low_confidence,
            label=str(reference.path) if truth is not None and reference is not None else None,
            preview=targets[PREVIEW].name if PREVIEW in targets else None,
        )
        if reference is not None and truth is None:
            out.record.extra["label_missing"] = str(reference.path)
        out.contents[QC] = out.record.to_json().encode()
        out.stage_ms["qc"] = (time.perf_counter() - clock) * 1e3
    return out


def write_file(path: Path, content: bytes, *, overwrite: bool) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(content)

    atomic_write(path, write, overwrite)
