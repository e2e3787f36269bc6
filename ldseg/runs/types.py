"""The run's types, in a module of their own so every run module can import them and none imports
back: options, the per-input result, the QC hook's protocol, and the run summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ldseg.errors import LdsegError
from ldseg.runs.manifest import RunRow
from ldseg.runtime.samples import ModelGridArray

if TYPE_CHECKING:
    from ldseg.io.formats.dicom_seg import Algorithm
    from ldseg.runs.volumes import Prepared


@dataclass(frozen=True)
class RunOptions:
    steps: int | None = None
    sampler: str | None = None
    seed: int = 0
    samples: int = 1
    save_probabilities: bool = False
    overwrite: bool = False
    fail_fast: bool = False
    skip_existing: bool = False  # an input whose outputs all exist is skipped (resume)
    output_types: tuple[str, ...] = ("nifti",)  # nifti | nrrd | mha | dicom-seg (ldseg.runs.outputs)
    seg_type: str = "binary"  # DICOM SEG: binary | fractional
    series: str | None = None  # DICOM SeriesInstanceUID to read from a folder holding several
    algorithm: Algorithm | None = None  # written into a DICOM SEG (checkpoint hash, parameters)
    run_key: str = ""  # what decides the outputs (outputs.run_key): a manifest row counts as done under it only


@dataclass
class RunSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, LdsegError]] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    records: list[Any] = field(default_factory=list)  # VolumeExtras' record per written volume (ldseg.qc)
    rows: list[RunRow] = field(default_factory=list)  # this run's manifest rows (ok, failed, skipped)
    resumed: list[Path] = field(default_factory=list)  # done by an earlier run (its manifest row is ok)
    manifest_problem: str | None = None  # why the run manifest is incomplete (e.g. a full disk)
    volumes: int = 0
    seconds: float = 0.0


@dataclass
class Segmentation:
    """One input's result: the maps to write, stage times, and (for QC) the model-grid votes."""

    outputs: dict[str, tuple[np.ndarray, type]]  # {output suffix: (array on input grid, dtype)}
    stage_ms: dict[str, float]
    votes: ModelGridArray  # (K, *grid) uint8: each sample's labels on the model grid
    mean_probabilities: ModelGridArray  # (num_classes, *grid): mean over the K samples, model grid
    # (both possibly still on the backend's device: ldseg.runtime.samples.host brings them over)


@dataclass
class ExtraFiles:
    """What a VolumeExtras adds for one volume: file contents by target suffix, a record for the
    run summary, and stage times."""

    contents: dict[str, bytes] = field(default_factory=dict)
    record: Any = None
    stage_ms: dict[str, float] = field(default_factory=dict)


class VolumeExtras(Protocol):
    """More files per volume beside the maps (ldseg.qc: preview picture, QC sidecar). They are
    planned with the maps (existing outputs, --skip-existing) and written with them, all or nothing."""

    def targets(self, out_dir: Path, input_path: Path) -> dict[str, Path]:
        """{suffix: path} of the extra files of `input_path`, known before it is read."""
        ...

    def start(self, prepared: Prepared) -> Callable[[Segmentation, dict[str, Path]], ExtraFiles]:
        """Called before the model runs (so a bad reference label fails first); the returned
        function makes the files from the segmentation and the extras' own targets."""
        ...
