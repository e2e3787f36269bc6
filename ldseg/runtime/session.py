"""Segment files with any Backend: read ahead, run, write results atomically, survive bad files."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldseg.errors import InputError, LdsegError, OutputError
from ldseg.model.config import ModelConfig
from ldseg.runtime.backend import Backend, make_inputs
from ldseg.runtime.volumes import (
    Prepared,
    map_to_input_grid,
    output_path,
    prepare,
    to_input_grid,
    write_map,
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


@dataclass
class RunSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, LdsegError]] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
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
    if opts.save_probabilities:
        suffixes += [f"_prob{c}" for c in range(cfg.num_classes)]
    return suffixes


def precision_note(backend: Backend) -> str | None:
    """What a reduced-precision result records in its header ("ldseg openvino bf16"); None for FP32."""
    return None if backend.precision == "fp32" else f"ldseg {backend.name} {backend.precision}"


def segment_prepared(
    prepared: Prepared, backend: Backend, cfg: ModelConfig, opts: RunOptions
) -> tuple[dict[str, tuple[np.ndarray, type]], dict[str, float]]:
    """Run one prepared input; returns {output suffix: (array on input grid, dtype)} and stage times."""
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
    if opts.save_probabilities:
        for c in range(cfg.num_classes):
            outputs[f"_prob{c}"] = (map_to_input_grid(prepared, mean[c]), np.float32)
    assert list(outputs) == output_suffixes(cfg, opts)  # run_files plans the file names from that list
    return outputs, result.stage_ms


def _read_ahead(paths: list[Path], cfg: ModelConfig) -> Iterator[tuple[Path, Future[Prepared]]]:
    """Decode the next file (gzip NIfTI can cost more than the model) while this one computes."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, paths[0], cfg) if paths else None
        for i, path in enumerate(paths):
            assert pending is not None
            current = pending
            pending = pool.submit(prepare, paths[i + 1], cfg) if i + 1 < len(paths) else None
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
) -> RunSummary:
    summary = RunSummary()
    clock = time.perf_counter()
    suffixes = output_suffixes(cfg, opts)
    note = precision_note(backend)

    def targets_of(path: Path) -> dict[str, Path]:
        return {suffix: output_path(out_dir, path, cfg, suffix) for suffix in suffixes}

    todo = []
    for path in paths:
        if opts.skip_existing and all(t.exists() for t in targets_of(path).values()):
            summary.skipped.append(path)
            on_done(path, None)
        else:
            todo.append(path)
    for path, future in _read_ahead(todo, cfg):
        try:
            targets = targets_of(path)
            if not opts.overwrite:  # checked before computing; all-or-nothing per volume
                existing = [t for t in targets.values() if t.exists()]
                if existing:
                    hint = "use --overwrite" + ("" if opts.skip_existing else ", or --skip-existing to resume")
                    raise OutputError(f"{existing[0]}: exists ({hint})")
            prepared = _prepared(path, future)
            outputs, stage_ms = segment_prepared(prepared, backend, cfg, opts)
            written: list[Path] = []
            try:
                for suffix, (values, dtype) in outputs.items():
                    write_map(targets[suffix], prepared, values, overwrite=opts.overwrite, dtype=dtype,
                              description=note)
                    written.append(targets[suffix])
            except BaseException:
                # Disk full or Ctrl-C after some of this volume's maps: remove those, so a
                # volume's outputs stay all-or-nothing (each file itself is written atomically).
                for target in written:
                    target.unlink(missing_ok=True)
                raise
            summary.written += written
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
