"""One request through the steps ldseg-run takes for one input, so the files are ldseg-run's files.

    plan_and_read (a worker thread) -> infer (the model's thread) -> finish (a worker thread)

They are the run orchestration's own steps (plan, check, read; infer; back to the input grid and
write, atomic, with the same header note), called here one input at a time instead of over a
folder. This is the only ldseg.serve module that imports the orchestration, so a move of those
modules touches the imports here and nothing else.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ldseg.api import Segmenter
from ldseg.model.config import ModelConfig
from ldseg.runs.cohort import CohortInput
from ldseg.runs.inference import infer, on_input_grid
from ldseg.runs.outputs import output_suffixes, plan_options
from ldseg.runs.specs import WriteSpec
from ldseg.runs.steps import Producer, ReadVolume, check_writable, plan_volume, read_volume, write_volume
from ldseg.runs.types import RunOptions
from ldseg.runtime.samples import SampleResult
from ldseg.runtime.volume_ops import VolumeOps

__all__ = ["Inferred", "RunOptions", "Written", "finish", "infer_read", "options_for", "plan_and_read"]


@dataclass(frozen=True)
class Inferred:
    """The model's part of one request: the K samples (left on the backend's device where its volume
    ops finish the request) and the time it took."""

    result: SampleResult
    infer_ms: float
    batch_size: int = 1  # requests in the Serve batch this one ran in

    @property
    def stage_ms(self) -> dict[str, float]:
        return self.result.stage_ms


@dataclass(frozen=True)
class Written:
    files: list[Path]
    stage_ms: dict[str, float]


def options_for(
    seg: Segmenter,
    *,
    samples: int,
    steps: int | None,
    seed: int,
    output_type: str,
    seg_type: str = "binary",
    series: str | None = None,
) -> RunOptions:
    """The RunOptions ldseg-run goes by for these options: Segmenter.write's own planning
    (runs.outputs.plan_options: options checked, ValueError; the SEG's algorithm record)."""
    sampling = dataclasses.replace(seg.sampling, samples=samples, steps=steps, seed=seed)
    write = WriteSpec(output_types=(output_type,), seg_type=seg_type, series=series)
    return plan_options(seg.source, seg.config, sampling, write, seg.model.precision)


def plan_and_read(
    path: Path, out_dir: Path, cfg: ModelConfig, opts: RunOptions, ops: VolumeOps | None = None
) -> ReadVolume:
    """Plan the input's files, refuse what cannot be written, read and preprocess (InputError)."""
    plan = plan_volume(CohortInput(path), out_dir, cfg, opts, output_suffixes(cfg, opts), None)
    check_writable(plan, opts)
    return read_volume(plan, cfg, opts.series, None, ops)


def infer_read(read: ReadVolume, seg: Segmenter, opts: RunOptions) -> Inferred:
    """The model on one read input (call it on the model's thread only)."""
    clock = time.perf_counter()
    result = infer(read.prepared.image, seg.backend, seg.config, opts, resident=seg.backend.volume_ops() is not None)
    return Inferred(result, (time.perf_counter() - clock) * 1e3)


def finish(
    read: ReadVolume,
    inferred: Inferred,
    cfg: ModelConfig,
    opts: RunOptions,
    producer: Producer,
    ops: VolumeOps | None = None,
) -> Written:
    """Back to the input grid and written, exactly as a run writes them (no manifest)."""
    clock = time.perf_counter()
    result = on_input_grid(read.prepared, inferred.result, cfg, opts, ops)
    grid_ms = (time.perf_counter() - clock) * 1e3
    done = write_volume(read, result, cfg, opts, producer=producer, infer_ms=inferred.infer_ms, manifest=None)
    write_ms = (time.perf_counter() - clock) * 1e3 - grid_ms
    return Written(done.files, {"read": read.read_ms, "to_input_grid": grid_ms, "write": write_ms})


def producer_of(seg: Segmenter) -> Producer:
    return Producer(seg.backend.name, seg.backend.device, seg.backend.precision)
