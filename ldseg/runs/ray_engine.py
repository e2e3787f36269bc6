"""`ldseg-run --engine ray`: a cohort on Ray Data, on one machine or a cluster.

    read + preprocess (Ray tasks) -> model (a pool of actors) -> back to the input grid + write (Ray tasks)

Each actor builds its backend once through the normal selection (artifact cache included) and keeps
it warm: the sampling loop, CUDA-graph replays included, runs inside the actor, never across the
network. Reading and writing are the same steps as the local loop (runs/steps.py), so the
files, names, atomicity, --overwrite/--skip-existing rules and manifest rows are the same; the write
task appends each input's manifest row itself, under the manifest's file lock, so rows survive the
driver. On a cluster, inputs, outputs and the artifact cache must be on storage every node sees,
and ldseg must be installed on every node.

Payloads cross Ray as cloudpickled bytes (one binary column): a Prepared volume carries its
header and geometry, which Arrow has no type for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ldseg.errors import ArtifactError, BackendUnavailable, InputError, LdsegError, OutputError
from ldseg.model.config import ModelConfig
from ldseg.runs.cohort import CohortInput, CohortStats
from ldseg.runs.inference import infer, on_input_grid
from ldseg.runs.manifest import RunManifest, RunRow
from ldseg.runs.specs import ModelSpec, SamplingSpec, WriteSpec
from ldseg.runs.steps import (
    Producer,
    ReadVolume,
    VolumePlan,
    check_writable,
    failed_row,
    read_volume,
    write_volume,
)
from ldseg.runs.types import RunOptions, VolumeExtras
from ldseg.runtime.artifacts.source import Source
from ldseg.runtime.backend import Backend

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'ldseg[ray]'"
READ_WRITE_CPUS = 0.5  # logical CPUs a read or write task asks for: decoding overlaps the model
# Inputs per read/write task. One per task paid Ray's per-task latency (~0.1 s on 2 cores) on every
# volume and starved the actors; 4 amortizes it (64 demo volumes: 1.7 -> 12 volumes/s, 2 cores).
ROWS_PER_TASK = 4


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start Ray on this machine's cores
    workers: int = 1  # model actors
    gpus_per_worker: float | None = None  # 0: CPU actors; None: 1 where the cluster has GPUs, else 0
    batch: int = 1  # volumes handed to an actor per call
    threads: int | None = None  # per CPU actor; None: this machine's cores split among the actors

    def __post_init__(self) -> None:
        if self.workers < 1 or self.batch < 1 or (self.gpus_per_worker is not None and self.gpus_per_worker < 0):
            raise ValueError("--workers and --batch must be at least 1, --gpus-per-worker at least 0")


@dataclass
class RayRun:
    rows: list[RunRow] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)  # the extras' records (ldseg.qc)
    written: list[Path] = field(default_factory=list)


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the extra brings both; ray alone lacks Ray Data's deps)
    except ImportError as exc:
        raise BackendUnavailable(INSTALL_HINT) from exc
    return ray


def _dumps(value: Any) -> bytes:
    from ray import cloudpickle

    return bytes(cloudpickle.dumps(value))


def _loads(data: bytes) -> Any:
    from ray import cloudpickle

    return cloudpickle.loads(data)


# ---------------------------------------------------------------------------- the three stages
# Each payload is ("read", ReadVolume), ("inferred", ReadVolume, result) or ("failed", RunRow).


@dataclass(frozen=True)
class _Job:
    """What every task needs besides its payload (sent once per stage, not per row)."""

    cfg: ModelConfig
    opts: RunOptions
    extras: VolumeExtras | None
    out_dir: Path


def _read_task(row: dict[str, Any], job: bytes) -> dict[str, Any]:
    spec: _Job = _loads(job)
    plan: VolumePlan = _loads(row["payload"])
    try:
        check_writable(plan, spec.opts)
        payload: tuple[Any, ...] = ("read", read_volume(plan, spec.cfg, spec.opts.series, spec.extras))
    except LdsegError as exc:
        payload = ("failed", failed_row(plan.item, exc, spec.opts.run_key))
    return {"payload": _dumps(payload)}


class ModelHandle(Protocol):
    """What an actor keeps warm: a backend and its close (ldseg.api.Segmenter is one)."""

    @property
    def backend(self) -> Backend: ...

    def close(self) -> None: ...


# Makes an actor's model from the specs (the CLI passes ldseg.api.Segmenter.of): the run layer
# receives it instead of importing the API above it.
MakeModel = Callable[[ModelSpec, SamplingSpec], ModelHandle]


class _ModelActor:
    """One warm backend, made by `make_model` (the normal selection, cache included)."""

    def __init__(self, model: ModelSpec, sampling: SamplingSpec, job: bytes, make_model: MakeModel):
        self.spec: _Job = _loads(job)
        self.segmenter = make_model(model, sampling)
        backend = self.segmenter.backend
        self.producer = Producer(backend.name, backend.device, backend.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for data in batch["payload"]:
            payload = _loads(data)
            if payload[0] == "read":
                payload = self._infer(payload[1])
            out.append(_dumps(payload))
        return {"payload": np.array(out, dtype=object)}

    def _infer(self, read: ReadVolume) -> tuple[Any, ...]:
        clock = time.perf_counter()
        try:
            # Host arrays (resident=False): the result crosses to a writer process.
            result = infer(read.prepared.image, self.segmenter.backend, self.spec.cfg, self.spec.opts)
        except LdsegError as exc:
            return ("failed", failed_row(read.plan.item, exc, self.spec.opts.run_key, self.producer))
        except Exception as exc:  # one volume's crash in the model fails its row, not the run
            error = LdsegError(f"{read.plan.item.path}: the model failed ({type(exc).__name__}: {exc})")
            return ("failed", failed_row(read.plan.item, error, self.spec.opts.run_key, self.producer))
        return ("inferred", read, result, (time.perf_counter() - clock) * 1e3, self.producer)


def _write_task(row: dict[str, Any], job: bytes) -> dict[str, Any]:
    spec: _Job = _loads(job)
    payload = _loads(row["payload"])
    manifest = RunManifest(spec.out_dir)
    record = None
    if payload[0] == "failed":
        result_row: RunRow = payload[1]
        manifest.append(result_row)
    else:
        _, read, result, infer_ms, producer = payload
        try:
            segmentation = on_input_grid(read.prepared, result, spec.cfg, spec.opts)
            done = write_volume(
                read, segmentation, spec.cfg, spec.opts, producer=producer, infer_ms=infer_ms, manifest=manifest
            )
            result_row, record = done.row, done.record
        except Exception as exc:  # a writer's bug on one volume fails its row, not the run
            error = exc if isinstance(exc, LdsegError) else LdsegError(f"{read.plan.item.path}: writing failed ({exc})")
            result_row = failed_row(read.plan.item, error, spec.opts.run_key, producer)
            manifest.append(result_row)
    return {"payload": _dumps((result_row, record))}


# ---------------------------------------------------------------------------- the driver


def _build_backend(model: ModelSpec, sampling: SamplingSpec, make_model: MakeModel) -> tuple[str, str] | None:
    """In a worker: build the backend an actor would (exporting into the artifact cache if needed)."""
    try:
        make_model(model, sampling).close()
    except LdsegError as exc:
        return type(exc).__name__, str(exc)
    return None


def _probe_backend(ray: Any, model: ModelSpec, sampling: SamplingSpec, make_model: MakeModel, gpus: float) -> None:
    """Build the backend once where an actor would run before any actor starts: a backend that
    cannot run there is one line with its own exit code (not an actor's traceback), and a first
    export into the artifact cache happens once, not in every actor at the same time."""
    remote = ray.remote(_build_backend).options(num_cpus=1, num_gpus=gpus or 0)
    failure = ray.get(remote.remote(model, sampling, make_model))
    if failure is not None:
        kinds = {cls.__name__: cls for cls in (InputError, ArtifactError, OutputError, BackendUnavailable)}
        raise kinds.get(failure[0], LdsegError)(failure[1])


def _one_line(exc: BaseException) -> LdsegError:
    """The ldseg error inside Ray's wrapping (a RayTaskError's cause), or the run's failure in one line."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        inner = getattr(cur, "cause", None)
        if isinstance(inner, LdsegError):
            return type(inner)(str(inner))
        cur = inner if isinstance(inner, BaseException) else (cur.__cause__ or cur.__context__)
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return LdsegError(f"the Ray run stopped: {type(exc).__name__}: {first}")


def _start(ray: Any, options: RayOptions) -> bool:
    """Connect to (or start) Ray; True if this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    # ldseg-run reports progress and failures itself; Ray's own INFO lines would interleave with them.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    env = {k: os.environ[k] for k in ("LDSEG_CACHE", "OMP_NUM_THREADS") if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if options.address is not None:
        ray.init(address=options.address, runtime_env=runtime_env, logging_level=logging.ERROR)
    else:
        cores = os.cpu_count() or 1
        # Logical CPUs: one per actor plus room for the read/write tasks, whatever the core count.
        ray.init(
            num_cpus=max(cores, options.workers + 1),
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging.ERROR,
        )
    return True


def run_on_ray(
    plans: list[VolumePlan],
    model: ModelSpec,
    sampling: SamplingSpec,
    make_model: MakeModel,
    cfg: ModelConfig,
    opts: RunOptions,
    options: RayOptions,
    out_dir: Path,
    *,
    extras: VolumeExtras | None = None,
    on_row: Callable[[RunRow], None] = lambda row: None,
) -> RayRun:
    """Segment the planned inputs on Ray; each actor makes its model with `make_model(model, sampling)`.
    Rows reach `on_row` as volumes finish, in any order."""
    ray = import_ray()
    run = RayRun()
    if not plans:
        return run
    started = _start(ray, options)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ldseg-run shows its own bar over volumes
        context.print_on_execution_start = False
        job = _dumps(_Job(cfg, opts, extras, out_dir))
        gpus = options.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        actor_model = model
        if gpus == 0:
            cores = os.cpu_count() or 1
            actor_model = dataclasses.replace(model, threads=options.threads or max(1, cores // options.workers))
        _probe_backend(ray, actor_model, sampling, make_model, gpus)
        items = [{"payload": _dumps(plan)} for plan in plans]
        # Blocks of up to ROWS_PER_TASK inputs, but at least two per actor so that reading overlaps.
        per_block = max(1, min(ROWS_PER_TASK, len(items) // (2 * options.workers)))
        dataset = (
            ray.data.from_items(items, override_num_blocks=-(-len(items) // per_block))
            .map(_read_task, fn_kwargs={"job": job}, num_cpus=READ_WRITE_CPUS)
            .map_batches(
                _ModelActor,
                fn_constructor_kwargs={
                    "model": actor_model,
                    "sampling": sampling,
                    "job": job,
                    "make_model": make_model,
                },
                batch_size=options.batch,
                compute=ray.data.ActorPoolStrategy(size=options.workers),
                num_cpus=1,
                num_gpus=gpus or None,
                batch_format="numpy",
            )
            .map(_write_task, fn_kwargs={"job": job}, num_cpus=READ_WRITE_CPUS)
        )
        try:
            for item in dataset.iter_rows():
                row, record = _loads(item["payload"])
                run.rows.append(row)
                if record is not None:
                    run.records.append(record)
                run.written += [Path(p) for p in row.outputs] if row.status == "ok" else []
                on_row(row)
        except Exception as exc:  # an actor that cannot start, a lost node: one line, not Ray's traceback
            raise _one_line(exc) from exc
    finally:
        if started:
            ray.shutdown()
    return run


# ---------------------------------------------------------------------------- a whole cohort


@dataclass
class CohortPlan:
    """What the driver decides before Ray starts: no model is loaded here, only its configuration."""

    source: Source
    config: ModelConfig
    opts: RunOptions
    manifest: RunManifest
    todo: list[VolumePlan]
    done: list[VolumePlan]  # an earlier run's ok row under the same run key, outputs present
    skipped: list[RunRow]  # --skip-existing: outputs present, no such row
    extras: VolumeExtras | None = None

    @property
    def is_demo(self) -> bool:
        return self.source.checkpoint == "demo"


def plan_cohort(
    items: list[CohortInput],
    out_dir: Path,
    model: ModelSpec,
    sampling: SamplingSpec,
    write: WriteSpec,
    extras_for: Callable[[ModelConfig], VolumeExtras | None] = lambda cfg: None,
) -> CohortPlan:
    """Plan a Ray run as Segmenter.write plans a local one, from the specs every actor builds its
    backend from. ValueError for output options that cannot be combined; BackendUnavailable
    without the ray extra."""
    from ldseg.runs.local import plan_run, record_skipped
    from ldseg.runs.outputs import plan_options
    from ldseg.runtime.artifacts.source import source_config

    import_ray()  # says how to install it before anything else
    source = Source(model.checkpoint, model.bundle, model.engines)
    cfg = source_config(source.checkpoint, source.bundle, source.engines)
    opts = plan_options(source, cfg, sampling, write, model.precision)
    extras = extras_for(cfg)
    manifest = RunManifest(out_dir)
    todo, left = plan_run(items, out_dir, cfg, opts, extras, manifest)
    skipped = record_skipped(left["skip"], manifest, opts.run_key)
    return CohortPlan(source, cfg, opts, manifest, todo, left["done"], skipped, extras)


def run_cohort(
    plan: CohortPlan,
    model: ModelSpec,
    sampling: SamplingSpec,
    make_model: MakeModel,
    options: RayOptions,
    out_dir: Path,
    on_row: Callable[[RunRow], None] = lambda row: None,
) -> tuple[RayRun, CohortStats]:
    """Run a planned cohort on Ray; the manifest is compacted to one row per input at the end (Ctrl-C
    included). Returns the run and its numbers (skipped rows and earlier runs' inputs counted)."""
    clock = time.perf_counter()
    try:
        run = run_on_ray(
            plan.todo,
            model,
            sampling,
            make_model,
            plan.config,
            plan.opts,
            options,
            out_dir,
            extras=plan.extras,
            on_row=on_row,
        )
    finally:
        plan.manifest.compact()
    stats = CohortStats.of(plan.skipped + run.rows, len(plan.done), time.perf_counter() - clock)
    return run, stats
