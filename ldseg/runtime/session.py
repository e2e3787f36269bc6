"""Segment files with any Backend: read ahead, run, write results atomically, survive bad files,
and record each input in the run manifest (ldseg.runtime.run_manifest) as it finishes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ldseg.errors import LdsegError
from ldseg.io.formats.dicom_seg import Algorithm
from ldseg.model.config import ModelConfig
from ldseg.runtime.backend import Backend, make_inputs
from ldseg.runtime.cohort import CohortInput, key_of
from ldseg.runtime.outputs import seg_needs_probabilities
from ldseg.runtime.run_manifest import RunManifest, RunRow
from ldseg.runtime.volume_steps import (
    Producer,
    ReadVolume,
    VolumePlan,
    check_writable,
    failed_row,
    now_iso,
    plan_volume,
    read_volume,
    resume_state,
    was_writing,
    write_volume,
)
from ldseg.runtime.volumes import Prepared, map_to_input_grid, to_input_grid


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
    output_types: tuple[str, ...] = ("nifti",)  # nifti | nrrd | mha | dicom-seg (ldseg.runtime.outputs)
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


def vote_entropy(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-voxel entropy of K label votes (K, *grid), normalized to [0, 1] by log(num_classes)."""
    counts = np.stack([(labels == c).sum(axis=0) for c in range(num_classes)]).astype(np.float32)
    p = counts / labels.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return (terms.sum(axis=0) / np.log(num_classes)).astype(np.float32)


def output_suffixes(cfg: ModelConfig, opts: RunOptions) -> list[str]:
    """The maps one input produces, as file-name suffixes (segment_prepared's keys)."""
    suffixes = ["_seg"]
    if opts.samples > 1:
        suffixes += ["_confidence", "_entropy"]
    if opts.save_probabilities or seg_needs_probabilities(opts):
        suffixes += [f"_prob{c}" for c in range(cfg.num_classes)]
    return suffixes


@dataclass
class Segmentation:
    """One input's result: the maps to write, stage times, and (for QC) the model-grid votes."""

    outputs: dict[str, tuple[np.ndarray, type]]  # {output suffix: (array on input grid, dtype)}
    stage_ms: dict[str, float]
    votes: np.ndarray  # (K, *grid) uint8: each sample's labels on the model grid
    mean_probabilities: np.ndarray  # (num_classes, *grid): mean over the K samples, model grid


def segment_prepared(
    prepared: Prepared, backend: Backend, cfg: ModelConfig, opts: RunOptions
) -> tuple[dict[str, tuple[np.ndarray, type]], dict[str, float]]:
    """Run one prepared input; returns {output suffix: (array on input grid, dtype)} and stage times."""
    result = segment(prepared, backend, cfg, opts)
    return result.outputs, result.stage_ms


def infer(
    image: np.ndarray, backend: Backend, cfg: ModelConfig, opts: RunOptions
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The model on one prepared image (C, *grid), K samples (Backend.sample: one encoder run, the
    K chains as one batch, the decoder in memory-bounded chunks): the mean probabilities
    (num_classes, *grid), the K label votes (K, *grid) and the backend's stage times."""
    seeds = [opts.seed + k for k in range(opts.samples)]
    result = backend.sample(make_inputs(cfg, image[None], seeds, opts.steps, opts.sampler))
    return result.mean, result.votes, result.stage_ms


def on_input_grid(
    prepared: Prepared,
    mean: np.ndarray,
    votes: np.ndarray,
    stage_ms: dict[str, float],
    cfg: ModelConfig,
    opts: RunOptions,
) -> Segmentation:
    """infer's result as the maps to write, on the input's grid."""
    outputs: dict[str, tuple[np.ndarray, type]] = {"_seg": (to_input_grid(prepared, mean), np.uint8)}
    if opts.samples > 1:
        chosen = np.take_along_axis(mean, mean.argmax(axis=0)[None], axis=0)[0]
        outputs["_confidence"] = (map_to_input_grid(prepared, chosen), np.float32)
        entropy = vote_entropy(votes, cfg.num_classes)
        outputs["_entropy"] = (map_to_input_grid(prepared, entropy), np.float32)
    if opts.save_probabilities or seg_needs_probabilities(opts):
        for c in range(cfg.num_classes):
            outputs[f"_prob{c}"] = (map_to_input_grid(prepared, mean[c]), np.float32)
    assert list(outputs) == output_suffixes(cfg, opts)  # run_files plans the file names from that list
    return Segmentation(outputs, stage_ms, votes, mean)


def segment(prepared: Prepared, backend: Backend, cfg: ModelConfig, opts: RunOptions) -> Segmentation:
    """segment_prepared, also keeping the K votes and mean probabilities (model grid) that QC counts on."""
    return on_input_grid(prepared, *infer(prepared.image, backend, cfg, opts), cfg, opts)


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


def _read_ahead(
    plans: list[VolumePlan], cfg: ModelConfig, series: str | None, extras: VolumeExtras | None
) -> Iterator[tuple[VolumePlan, Future[ReadVolume]]]:
    """Decode the next file (gzip NIfTI can cost more than the model) while this one computes."""
    with ThreadPoolExecutor(max_workers=1) as pool:

        def submit(i: int) -> Future[ReadVolume] | None:
            return pool.submit(read_volume, plans[i], cfg, series, extras) if i < len(plans) else None

        pending = submit(0)
        for i, plan in enumerate(plans):
            assert pending is not None
            current, pending = pending, submit(i + 1)
            yield plan, current


def detached(exc: LdsegError) -> LdsegError:
    """Drop the tracebacks of `exc` and its causes before keeping it in a summary.

    A traceback keeps its frames, and so their locals, alive: a volume refused for NaN voxels
    would otherwise stay in memory for the rest of the run, one per failed file.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur.__traceback__ = None
        cur = cur.__cause__ or cur.__context__
    return exc


def plan_run(
    inputs: list[CohortInput],
    out_dir: Path,
    cfg: ModelConfig,
    opts: RunOptions,
    extras: VolumeExtras | None,
    manifest: RunManifest | None,
) -> tuple[list[VolumePlan], dict[str, list[VolumePlan]]]:
    """The inputs to run, and those left out: "done" (an earlier run's ok row, outputs present) and
    "skip" (--skip-existing). Compacts the manifest to one row per input first."""
    latest = manifest.compact() if manifest is not None else {}
    suffixes = output_suffixes(cfg, opts)
    todo: list[VolumePlan] = []
    left: dict[str, list[VolumePlan]] = {"done": [], "skip": []}
    for item in inputs:
        plan = plan_volume(item, out_dir, cfg, opts, suffixes, extras, replace=was_writing(item, latest))
        state = resume_state(plan, latest, opts)
        if state is None:
            todo.append(plan)
        else:
            left[state].append(plan)
    return todo, left


def record_skipped(plans: list[VolumePlan], manifest: RunManifest | None, run_key: str) -> list[RunRow]:
    """The `skipped` rows of the inputs --skip-existing leaves out, appended to the manifest."""
    rows = []
    for plan in plans:
        outputs = [str(f) for f in plan.files]
        rows.append(RunRow(key_of(plan.item.path), "skipped", outputs=outputs, finished=now_iso(), run_key=run_key))
        if manifest is not None:
            manifest.append(rows[-1])
    return rows


def run_files(
    paths: list[Path] | list[CohortInput],
    out_dir: Path,
    backend: Backend,
    cfg: ModelConfig,
    opts: RunOptions,
    on_done: Callable[[Path, str | None], None] = lambda path, error: None,
    extras: VolumeExtras | None = None,
    manifest: RunManifest | None = None,
) -> RunSummary:
    """Segment `paths` one by one into `out_dir` (reading the next while this one computes). With a
    `manifest`, each input's row is appended as it finishes, and inputs it records as done are skipped."""
    summary = RunSummary()
    clock = time.perf_counter()
    inputs = [p if isinstance(p, CohortInput) else CohortInput(p) for p in paths]
    producer = Producer(backend.name, backend.device, backend.precision)
    todo, left = plan_run(inputs, out_dir, cfg, opts, extras, manifest)
    summary.resumed = [plan.item.path for plan in left["done"]]
    summary.skipped = [plan.item.path for plan in left["skip"]]
    summary.rows = record_skipped(left["skip"], manifest, opts.run_key)
    for plan in left["done"] + left["skip"]:
        on_done(plan.item.path, None)
    try:
        _run_plans(todo, backend, cfg, opts, extras, manifest, producer, summary, on_done)
    finally:
        if manifest is not None:  # one row per input again (Ctrl-C included)
            manifest.compact()
            summary.manifest_problem = manifest.problem
    summary.seconds = time.perf_counter() - clock
    return summary


def _run_plans(
    todo: list[VolumePlan],
    backend: Backend,
    cfg: ModelConfig,
    opts: RunOptions,
    extras: VolumeExtras | None,
    manifest: RunManifest | None,
    producer: Producer,
    summary: RunSummary,
    on_done: Callable[[Path, str | None], None],
) -> None:
    for plan, future in _read_ahead(todo, cfg, opts.series, extras):
        path = plan.item.path
        try:
            check_writable(plan, opts)
            read = future.result()
            infer_clock = time.perf_counter()
            result = segment(read.prepared, backend, cfg, opts)
            infer_ms = (time.perf_counter() - infer_clock) * 1e3
            done = write_volume(read, result, cfg, opts, producer=producer, infer_ms=infer_ms, manifest=manifest)
            summary.written += done.files
            summary.rows.append(done.row)
            if done.record is not None:
                summary.records.append(done.record)
            for stage, ms in {**result.stage_ms, **done.stage_ms}.items():
                summary.stage_ms.setdefault(stage, []).append(ms)
            summary.volumes += 1
            on_done(path, None)
        except LdsegError as exc:
            row = failed_row(plan.item, exc, opts.run_key, producer)
            summary.rows.append(row)
            if manifest is not None:
                manifest.append(row)
            summary.failures.append((path, detached(exc)))
            on_done(path, str(exc))
            if opts.fail_fast:
                break
