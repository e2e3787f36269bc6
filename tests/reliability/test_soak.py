"""Soak: a long folder run keeps its memory flat and writes every output.

The 200-volume run uses the demo preset (random weights flagged trained, 2 sampling steps) on
four small phantoms linked under 200 names, in-process through run_files (the CLI's loop) to
skip process start-up. LDSEG_SOAK_VOLUMES overrides the count for a longer local soak.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldseg.errors import InputError
from ldseg.model.config import PRESETS
from ldseg.runs.local import run_files
from ldseg.runs.types import RunOptions
from tests.reliability.helpers import rss_mb, write_phantoms

CFG = PRESETS["demo"]
VOLUMES = int(os.environ.get("LDSEG_SOAK_VOLUMES", "200"))
WARMUP = 20  # allocator pools, oneDNN scratch buffers and the read-ahead thread settle by then
GROWTH_LIMIT_MB = 30.0


@pytest.mark.slow
def test_soak_folder_run_has_flat_memory(demo_backend, tmp_path, record_property):
    sources = write_phantoms(tmp_path / "src", 4, tmp_path / "truth")
    shapes = {p.name: nib.load(p).shape for p in sources}
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for i in range(VOLUMES):
        link = folder / f"v{i:04d}.nii.gz"
        link.symlink_to(sources[i % len(sources)])
        paths.append(link)
    out = tmp_path / "out"
    out.mkdir()

    samples: list[tuple[float, float]] = []  # (RSS, peak RSS) after each volume, in MB
    errors: list[str] = []

    def done(path: Path, error: str | None) -> None:
        if error:
            errors.append(error)
        samples.append(rss_mb())

    wall, cpu = time.perf_counter(), time.process_time()
    summary = run_files(paths, out, demo_backend, CFG, RunOptions(steps=2), on_done=done)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    rss = [s[0] for s in samples]
    peak = [s[1] for s in samples]
    record_property("soak_seconds", round(wall, 1))
    record_property("soak_cpu_seconds", round(cpu, 1))
    record_property("soak_rss_mb", [round(rss[WARMUP - 1]), round(rss[-1]), round(max(rss))])
    record_property("soak_peak_rss_mb", [round(peak[WARMUP - 1]), round(peak[-1])])
    print(
        f"\nsoak: {VOLUMES} volumes in {wall:.1f} s wall, {cpu:.1f} s CPU; RSS after volume "
        f"{WARMUP}: {rss[WARMUP - 1]:.0f} MB, after {VOLUMES}: {rss[-1]:.0f} MB "
        f"(max {max(rss):.0f}); peak RSS {peak[WARMUP - 1]:.0f} -> {peak[-1]:.0f} MB"
    )

    assert errors == [] and summary.failures == []
    assert summary.volumes == VOLUMES and len(summary.written) == VOLUMES
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"v{i:04d}_seg.nii.gz" for i in range(VOLUMES)]  # all there, no temp files
    for i, name in enumerate(names):
        img = nib.load(out / name)
        assert img.shape == shapes[sources[i % len(sources)].name]
        labels = np.asarray(img.dataobj)
        assert labels.dtype == np.uint8 and labels.max() <= 2

    # Memory must not grow with the number of files: compare settled medians (single samples
    # swing by tens of MB as glibc trims or keeps arenas) and the process's peak RSS.
    settled = statistics.median(rss[WARMUP - 10 : WARMUP + 10])
    final = statistics.median(rss[-20:])
    assert final - settled < GROWTH_LIMIT_MB, f"RSS grew {final - settled:.0f} MB over the run"
    assert peak[-1] - peak[WARMUP - 1] < GROWTH_LIMIT_MB, (
        f"peak RSS grew {peak[-1] - peak[WARMUP - 1]:.0f} MB after volume {WARMUP}"
    )


class _NeverCalled:
    name, device, precision = "none", "cpu", "fp32"

    def run(self, inputs, *, probabilities=False):  # pragma: no cover - the inputs all fail
        raise AssertionError("no input should reach the model")

    def volume_ops(self):
        return None  # the CPU path reads (and refuses) the inputs


def test_failed_files_do_not_pin_memory(tmp_path):
    """A run over many refused inputs keeps no voxels: a failure's traceback would hold the
    reader's frames (the whole NaN volume) for the rest of the run, once per failed file."""
    folder = tmp_path / "in"
    folder.mkdir()
    data = np.linspace(0, 1, 96**3, dtype=np.float32).reshape(96, 96, 96)  # 3.5 MB as float32
    data[5, 5, 5] = np.nan
    source = folder / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), source)
    paths = [source]
    for i in range(24):
        link = folder / f"nan{i:02d}.nii.gz"
        link.symlink_to(source)
        paths.append(link)

    tracemalloc.start()
    try:
        summary = run_files(paths, tmp_path / "out", _NeverCalled(), CFG, RunOptions())
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(summary.failures) == len(paths)
    assert all(isinstance(e, InputError) and "NaN" in str(e) for _, e in summary.failures)
    assert held < 8 * 2**20, f"{held / 2**20:.0f} MB still held by {len(paths)} failures"
