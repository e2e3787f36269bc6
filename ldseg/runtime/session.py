"""Segment files with any Backend: read ahead, run, write results atomically, survive bad files."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ldseg.errors import InputError, LdsegError, OutputError
from ldseg.io.atomic import atomic_write
from ldseg.io.formats.dicom_seg import Algorithm
from ldseg.model.config import ModelConfig
from ldseg.runtime.backend import Backend, make_inputs
from ldseg.runtime.outputs import Target, plan_targets, refuse_unwritable, seg_needs_probabilities, write_target
from ldseg.runtime.volumes import (
    Prepared,
    map_to_input_grid,
    prepare,
    to_input_grid,
)


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


@dataclass
class RunSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, LdsegError]] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    records: list[Any] = field(default_factory=list)  # VolumeExtras' record per written volume (ldseg.qc)
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


def segment(prepared: Prepared, backend: Backend, cfg: ModelConfig, opts: RunOptions) -> Segmentation:
    """segment_prepared, also keeping the K votes and mean probabilities (model grid) that QC counts on."""
    seeds = [opts.seed + k for k in range(opts.samples)]
    batch = np.repeat(prepared.image[None], opts.samples, axis=0)
    result = backend.run(make_inputs(cfg, batch, seeds, opts.steps, opts.sampler), probabilities=True)
    assert result.probabilities is not None
    mean = result.probabilities.mean(axis=0)
    outputs: dict[str, tuple[np.ndarray, type]] = {"_seg": (to_input_grid(prepared, mean), np.uint8)}
    if opts.samples > 1:
        chosen = np.take_along_axis(mean, mean.argmax(axis=0)[None], axis=0)[0]
        outputs["_confidence"] = (map_to_input_grid(prepared, chosen), np.float32)
        entropy = vote_entropy(result.labels, cfg.num_classes)
        outputs["_entropy"] = (map_to_input_grid(prepared, entropy), np.float32)
    if opts.save_probabilities or seg_needs_probabilities(opts):
        for c in range(cfg.num_classes):
            outputs[f"_prob{c}"] = (map_to_input_grid(prepared, mean[c]), np.float32)
    assert list(outputs) == output_suffixes(cfg, opts)  # run_files plans the file names from that list
    return Segmentation(outputs, result.stage_ms, result.labels, mean)


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


def _write_bytes(path: Path, content: bytes, overwrite: bool) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(content)

    atomic_write(path, write, overwrite)


def _read_ahead(
    paths: list[Path], cfg: ModelConfig, series: str | None = None
) -> Iterator[tuple[Path, Future[Prepared]]]:
    """Decode the next file (gzip NIfTI can cost more than the model) while this one computes."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, paths[0], cfg, series) if paths else None
        for i, path in enumerate(paths):
            assert pending is not None
            current = pending
            pending = pool.submit(prepare, paths[i + 1], cfg, series) if i + 1 < len(paths) else None
            yield path, current


def _detached(exc: LdsegError) -> LdsegError:
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


def _prepared(path: Path, future: Future[Prepared]) -> Prepared:
    """The read-ahead result; a reader bug on one odd file fails that file, not the whole run."""
    try:
        return future.result()
    except LdsegError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())
        raise InputError(f"{path}: unexpected error reading the file ({type(exc).__name__}: {detail})") from exc


def run_files(
    paths: list[Path],
    out_dir: Path,
    backend: Backend,
    cfg: ModelConfig,
    opts: RunOptions,
    on_done: Callable[[Path, str | None], None] = lambda path, error: None,
    extras: VolumeExtras | None = None,
) -> RunSummary:
    summary = RunSummary()
    clock = time.perf_counter()
    suffixes = output_suffixes(cfg, opts)

    def targets_of(path: Path) -> tuple[list[Target], dict[str, Path]]:
        """The maps to write (every output type asked for) and the extras' files, by suffix."""
        extra = extras.targets(out_dir, path) if extras is not None else {}
        return plan_targets(out_dir, path, cfg, opts, suffixes), extra

    def paths_of(planned: tuple[list[Target], dict[str, Path]]) -> list[Path]:
        return [target.path for target in planned[0]] + list(planned[1].values())

    todo = []
    for path in paths:
        if opts.skip_existing and all(t.exists() for t in paths_of(targets_of(path))):
            summary.skipped.append(path)
            on_done(path, None)
        else:
            todo.append(path)
    for path, future in _read_ahead(todo, cfg, opts.series):
        try:
            maps, extra_paths = planned = targets_of(path)
            refuse_unwritable(path, opts)
            if not opts.overwrite:  # checked before computing; all-or-nothing per volume
                existing = [t for t in paths_of(planned) if t.exists()]
                if existing:
                    hint = "use --overwrite" + ("" if opts.skip_existing else ", or --skip-existing to resume")
                    raise OutputError(f"{existing[0]}: exists ({hint})")
            prepared = _prepared(path, future)
            finish = extras.start(prepared) if extras is not None else None
            result = segment(prepared, backend, cfg, opts)
            stage_ms = dict(result.stage_ms)
            extra = finish(result, extra_paths) if finish is not None else None
            written: list[Path] = []
            try:
                for target in maps:
                    write_target(target, prepared, result.outputs, cfg, opts)
                    written.append(target.path)
                for suffix, content in extra.contents.items() if extra is not None else ():
                    _write_bytes(extra_paths[suffix], content, opts.overwrite)
                    written.append(extra_paths[suffix])
            except BaseException:
                # Disk full or Ctrl-C after some of this volume's maps: remove those, so a
                # volume's outputs stay all-or-nothing (each file itself is written atomically).
                for done in written:
                    done.unlink(missing_ok=True)
                raise
            summary.written += written
            if extra is not None:
                stage_ms.update(extra.stage_ms)
                if extra.record is not None:
                    summary.records.append(extra.record)
            for stage, ms in stage_ms.items():
                summary.stage_ms.setdefault(stage, []).append(ms)
            summary.volumes += 1
            on_done(path, None)
        except LdsegError as exc:
            summary.failures.append((path, _detached(exc)))
            on_done(path, str(exc))
            if opts.fail_fast:
                break
    summary.seconds = time.perf_counter() - clock
    return summary
