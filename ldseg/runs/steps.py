"""One input's way through a run, step by step: plan its files, read it, write its results, and the
manifest row that records it. The local loop (session.run_files) and the Ray engine (read and write
as Ray tasks, the model in actors) call the same steps, so both write the same files the same way.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ldseg.errors import InputError, LdsegError, OutputError
from ldseg.io.atomic import atomic_write
from ldseg.metrics import dice_per_class
from ldseg.model.config import ModelConfig
from ldseg.runs.cohort import CohortInput, key_of
from ldseg.runs.head_start import prepare_input
from ldseg.runs.manifest import RunManifest, RunRow, error_kind
from ldseg.runs.outputs import Target, plan_targets, refuse_unreferenced, refuse_unwritable, write_target
from ldseg.runs.volumes import Prepared, read_reference_labels

if TYPE_CHECKING:
    from ldseg.runs.types import ExtraFiles, RunOptions, Segmentation, VolumeExtras
    from ldseg.runtime.volume_ops import VolumeOps

Finish = Callable[["Segmentation", dict[str, Path]], "ExtraFiles"]


@dataclass(frozen=True)
class VolumePlan:
    """The files one input will produce, known before it is read."""

    item: CohortInput
    maps: list[Target]
    extras: dict[str, Path]  # VolumeExtras' files by suffix
    replace: bool = False  # the manifest says a run died while writing these: they are replaced

    @property
    def files(self) -> list[Path]:
        return [t.path for t in self.maps] + list(self.extras.values())


def plan_volume(
    item: CohortInput,
    out_dir: Path,
    cfg: ModelConfig,
    opts: RunOptions,
    suffixes: list[str],
    extras: VolumeExtras | None,
    replace: bool = False,
) -> VolumePlan:
    extra = extras.targets(out_dir, item.path) if extras is not None else {}
    return VolumePlan(item, plan_targets(out_dir, item.path, cfg, opts, suffixes), extra, replace)


def check_writable(plan: VolumePlan, opts: RunOptions) -> None:
    """Refuse, before any compute, what cannot or must not be written (all or nothing per volume)."""
    refuse_unwritable(plan.item.path, opts)
    if opts.overwrite or plan.replace:
        return
    existing = [p for p in plan.files if p.exists()]
    if existing:
        hint = "use --overwrite" + ("" if opts.skip_existing else ", or --skip-existing to resume")
        raise OutputError(f"{existing[0]}: exists ({hint})")


@dataclass
class ReadVolume:
    """What reading hands on to the model: the prepared input, its reference label and the QC
    extras' finishing step (started before the model runs, so a bad label fails first)."""

    plan: VolumePlan
    prepared: Prepared
    truth: np.ndarray | None
    finish: Finish | None
    started: float  # time.time() when reading began: a volume's latency counts from here
    read_ms: float


def read_volume(
    plan: VolumePlan,
    cfg: ModelConfig,
    series: str | None,
    extras: VolumeExtras | None,
    ops: VolumeOps | None = None,
) -> ReadVolume:
    """Read and preprocess one input (`ops`: on the backend's device)."""
    started, clock = time.time(), time.perf_counter()
    path = plan.item.path
    try:
        prepared = prepare_input(path, cfg, series, ops)  # the head start's result when there is one
        refuse_unreferenced(plan.maps, prepared)  # a SEG's source is checked before any compute
        truth = read_reference_labels(plan.item.label, prepared, cfg) if plan.item.label is not None else None
        finish = extras.start(prepared) if extras is not None else None
    except LdsegError:
        raise
    except Exception as exc:  # a reader bug on one odd file fails that file, not the run
        detail = " ".join(str(exc).split())
        raise InputError(f"{path}: unexpected error reading the file ({type(exc).__name__}: {detail})") from exc
    return ReadVolume(plan, prepared, truth, finish, started, (time.perf_counter() - clock) * 1e3)


def _write_bytes(path: Path, content: bytes, overwrite: bool) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(content)

    atomic_write(path, write, overwrite)


@dataclass
class Written:
    files: list[Path]
    record: Any  # the extras' record (ldseg.qc), or None
    stage_ms: dict[str, float]  # the extras' stage times
    row: RunRow


@dataclass(frozen=True)
class Producer:
    """Who ran the model, for the manifest row."""

    backend: str
    device: str
    precision: str
    host: str = dataclasses.field(default_factory=socket.gethostname)
    pid: int = dataclasses.field(default_factory=os.getpid)

    @property
    def note(self) -> str | None:
        """What a reduced-precision result records in its header ("ldseg openvino bf16"); None for FP32."""
        return None if self.precision == "fp32" else f"ldseg {self.backend} {self.precision}"


def write_volume(
    read: ReadVolume,
    result: Segmentation,
    cfg: ModelConfig,
    opts: RunOptions,
    *,
    producer: Producer,
    infer_ms: float,
    manifest: RunManifest | None,
) -> Written:
    """Write every planned file (each atomically; on any failure the volume's files written so far are
    removed), then append the input's ok row. A `writing` row goes first, so a run killed mid-write
    is known to the next one, which replaces what it left."""
    plan, clock = read.plan, time.perf_counter()
    if plan.replace:  # leftovers of a run that died writing them
        opts = dataclasses.replace(opts, overwrite=True)
    if manifest is not None:
        manifest.append(
            RunRow(key_of(plan.item.path), "writing", outputs=[str(p) for p in plan.files], run_key=opts.run_key)
        )
    extra = read.finish(result, plan.extras) if read.finish is not None else None
    written: list[Path] = []
    try:
        for target in plan.maps:
            write_target(target, read.prepared, result.outputs, cfg, opts, description=producer.note)
            written.append(target.path)
        for suffix, content in extra.contents.items() if extra is not None else ():
            _write_bytes(plan.extras[suffix], content, opts.overwrite)
            written.append(plan.extras[suffix])
    except BaseException:
        # Disk full or Ctrl-C after some of this volume's files: remove those, so a volume's
        # outputs stay all-or-nothing (each file itself is written atomically).
        for done in written:
            done.unlink(missing_ok=True)
        raise
    write_ms = (time.perf_counter() - clock) * 1e3
    row = RunRow(
        key_of(plan.item.path),
        "ok",
        outputs=[str(p) for p in written],
        backend=producer.backend,
        device=producer.device,
        precision=producer.precision,
        host=producer.host,
        pid=producer.pid,
        finished=now_iso(),
        seconds=time.time() - read.started,
        read_ms=read.read_ms,
        infer_ms=infer_ms,
        write_ms=write_ms,
        stages=dict(result.stage_ms),
        run_key=opts.run_key,
    )
    if read.truth is not None:
        scores = dice_per_class(result.outputs["_seg"][0], read.truth, cfg.num_classes)
        row.label = str(plan.item.label)
        row.dice = {cfg.names[c]: round(d, 6) for c, d in scores.items()}
        row.dice_mean = float(np.mean(list(scores.values())))
    if manifest is not None:
        manifest.append(row)
    return Written(written, extra.record if extra else None, dict(extra.stage_ms) if extra else {}, row)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def failed_row(item: CohortInput, exc: LdsegError, run_key: str, producer: Producer | None = None) -> RunRow:
    row = RunRow(key_of(item.path), "failed", error_kind=error_kind(exc), error=str(exc), finished=now_iso())
    row.run_key = run_key
    if producer is not None:
        row.backend, row.device, row.precision = producer.backend, producer.device, producer.precision
        row.host, row.pid = producer.host, producer.pid
    if item.label is not None:
        row.label = str(item.label)
    return row


def resume_state(plan: VolumePlan, latest: dict[str, RunRow], opts: RunOptions) -> str | None:
    """What a rerun does with this input: "done" (its last row is ok, made with the same model and
    settings, and every output exists: skip it, keep the row), "skip" (--skip-existing and every
    output exists), or None (run it)."""
    if opts.overwrite:
        return None
    row = latest.get(key_of(plan.item.path))
    complete = all(p.exists() for p in plan.files)
    if row is not None and row.status == "ok" and row.run_key == opts.run_key and complete:
        return "done"
    if opts.skip_existing and complete:
        return "skip"
    return None


def was_writing(item: CohortInput, latest: dict[str, RunRow]) -> bool:
    row = latest.get(key_of(item.path))
    return row is not None and row.status == "writing"
