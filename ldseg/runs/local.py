"""Segment files with any Backend: read ahead, run, write results atomically, survive bad files,
and record each input in the run manifest (ldseg.runs.manifest) as it finishes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ldseg.errors import LdsegError
from ldseg.model.config import ModelConfig
from ldseg.runs.cohort import CohortInput, key_of
from ldseg.runs.inference import infer, on_input_grid
from ldseg.runs.manifest import RunManifest, RunRow
from ldseg.runs.outputs import output_suffixes
from ldseg.runs.steps import (
    Producer,
    ReadVolume,
    VolumePlan,
    Written,
    check_writable,
    failed_row,
    now_iso,
    plan_volume,
    read_volume,
    resume_state,
    was_writing,
    write_volume,
)
from ldseg.runs.types import RunOptions, RunSummary, VolumeExtras
from ldseg.runtime.backend import Backend
from ldseg.runtime.samples import SampleResult
from ldseg.runtime.volume_ops import VolumeOps


def _read_ahead(
    plans: list[VolumePlan], cfg: ModelConfig, series: str | None, extras: VolumeExtras | None, ops: VolumeOps | None
) -> Iterator[tuple[VolumePlan, Future[ReadVolume]]]:
    """Decode the next file (gzip NIfTI can cost more than the model) while this one computes."""
    with ThreadPoolExecutor(max_workers=1) as pool:

        def submit(i: int) -> Future[ReadVolume] | None:
            return pool.submit(read_volume, plans[i], cfg, series, extras, ops) if i < len(plans) else None

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


@dataclass
class _Inferred:
    """One input between the model and its files: what the writer thread turns into files."""

    plan: VolumePlan
    read: ReadVolume
    result: SampleResult  # on the backend's device where its volume ops resample it
    infer_ms: float


def _write(
    done: _Inferred,
    cfg: ModelConfig,
    opts: RunOptions,
    producer: Producer,
    manifest: RunManifest | None,
    ops: VolumeOps | None,
) -> Written:
    """Resample to the input grid and write (the writer thread, while the next input computes)."""
    clock = time.perf_counter()
    result = on_input_grid(done.read.prepared, done.result, cfg, opts, ops)
    result.stage_ms["resample"] = (time.perf_counter() - clock) * 1e3
    return write_volume(done.read, result, cfg, opts, producer=producer, infer_ms=done.infer_ms, manifest=manifest)


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
    """Three stages in flight: the next input is read, this one runs on the model, the previous one is
    resampled and written (one of each at a time, so memory stays at three volumes)."""

    def failed(plan: VolumePlan, exc: LdsegError) -> None:
        row = failed_row(plan.item, exc, opts.run_key, producer)
        summary.rows.append(row)
        if manifest is not None:
            manifest.append(row)
        summary.failures.append((plan.item.path, detached(exc)))
        on_done(plan.item.path, str(exc))

    def collect(pending: tuple[VolumePlan, Future[Written]] | None) -> bool:
        """Record a finished write; False when it failed (for --fail-fast)."""
        if pending is None:
            return True
        plan, future = pending
        try:
            done = future.result()
        except LdsegError as exc:
            failed(plan, exc)
            return False
        summary.written += done.files
        summary.rows.append(done.row)
        if done.record is not None:
            summary.records.append(done.record)
        for stage, ms in {**done.row.stages, **done.stage_ms}.items():
            summary.stage_ms.setdefault(stage, []).append(ms)
        summary.volumes += 1
        on_done(plan.item.path, None)
        return True

    pending: tuple[VolumePlan, Future[Written]] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ldseg-write") as writer:
        ops = backend.volume_ops()
        for plan, future in _read_ahead(todo, cfg, opts.series, extras, ops):
            try:
                check_writable(plan, opts)
                read = future.result()
                clock = time.perf_counter()
                result = infer(read.prepared.image, backend, cfg, opts, resident=ops is not None)
                inferred = _Inferred(plan, read, result, (time.perf_counter() - clock) * 1e3)
            except LdsegError as exc:
                collect(pending)
                pending = None
                failed(plan, exc)
                if opts.fail_fast:
                    break
                continue
            ok, pending = collect(pending), None
            if not ok and opts.fail_fast:
                break
            pending = (plan, writer.submit(_write, inferred, cfg, opts, producer, manifest, ops))
        collect(pending)
