"""`ldseg-run --engine ray` on a local Ray instance (this machine's CPUs): per-input isolation, the
same files as the local engine, and resume after Ctrl-C. Ray's start (a few seconds) is paid once
per run, so the runs here are few."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldseg.runs.manifest import RunManifest
from tests.cli.test_run_cohort import RUN, ldseg_run, phantoms
from tests.helpers import assert_several_classes, ctrl_c_as_at_a_terminal

pytest.importorskip("ray.data", reason="the Ray engine needs the ray extra (pip install 'ldseg[ray]')")
BIN = Path(sys.executable).parent


def statuses(out: Path) -> dict[str, str]:
    return {Path(k).name: r.status for k, r in RunManifest(out).latest().items()}


def test_ray_isolates_bad_inputs_and_writes_what_the_local_engine_writes(tmp_path: Path):
    inputs = tmp_path / "in"
    phantoms(inputs, range(6))
    (inputs / "bad_text.nii.gz").write_text("not a volume")
    good = (inputs / "p0.nii.gz").read_bytes()
    (inputs / "bad_cut.nii.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"

    result = ldseg_run(str(inputs), "-o", str(ray_out), "--engine", "ray", "--workers", "2", *RUN)
    assert result.returncode == 3, result.stderr  # some inputs failed, all of them bad input
    assert "failed: 2 (2 input)" in result.stderr and "per-volume latency" in result.stderr
    assert sorted(p.name for p in ray_out.glob("*_seg.nii.gz")) == [f"p{s}_seg.nii.gz" for s in range(6)]
    rows = RunManifest(ray_out).latest()
    assert sorted(r.status for r in rows.values()) == ["failed"] * 2 + ["ok"] * 6
    failed = {Path(k).name: r for k, r in rows.items() if r.status == "failed"}
    assert set(failed) == {"bad_text.nii.gz", "bad_cut.nii.gz"}
    assert all(r.error_kind == "input" and k in r.error for k, r in failed.items())
    ok = [r for r in rows.values() if r.status == "ok"]
    assert {r.backend for r in ok} == {"torch"} and all(r.infer_ms and r.read_ms and r.write_ms for r in ok)
    # Each input ran once (one row each in the whole manifest, not only the latest), whichever actor
    # Ray gave it to: how the two actors shared the work is Ray's scheduling, not ldseg's behaviour.
    with (ray_out / "ldseg-run.csv").open(newline="") as f:
        every_row = [Path(row["input"]).name for row in csv.DictReader(f)]
    assert sorted(every_row) == sorted(Path(k).name for k in rows), every_row
    assert not [p for p in ray_out.iterdir() if p.name.startswith(".") and "lock" not in p.name]  # no temp files

    local = ldseg_run(str(inputs), "-o", str(local_out), *RUN)
    assert local.returncode == 3, local.stderr
    for seed in range(6):
        name = f"p{seed}_seg.nii.gz"
        ray_img, local_img = nib.load(ray_out / name), nib.load(local_out / name)
        assert_several_classes(np.asarray(ray_img.dataobj), name)  # equality of one-class maps would say little
        assert np.array_equal(np.asarray(ray_img.dataobj), np.asarray(local_img.dataobj)), name
        assert np.array_equal(ray_img.affine, local_img.affine)


def test_ray_run_interrupted_then_rerun_skips_the_finished_ones(tmp_path: Path):
    inputs = tmp_path / "in"
    seeds = range(12)
    phantoms(inputs, seeds)
    out = tmp_path / "out"
    # More steps than elsewhere, so the run is still going when it is interrupted.
    args = [str(inputs), "-o", str(out), "--engine", "ray", "--workers", "1", "--backend", "torch", "--threads", "1"]
    env = {**os.environ, "PYTHONUTF8": "1"}
    run = subprocess.Popen(
        [str(BIN / "ldseg-run"), *args, "--steps", "40"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_as_at_a_terminal,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        if (out / "ldseg-run.csv").exists() and list(statuses(out).values()).count("ok") >= 2:
            break
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0, "the run finished before it could be interrupted"
    before = RunManifest(out).latest()
    done = {k: r for k, r in before.items() if r.status == "ok"}
    assert 2 <= len(done) < len(seeds), stderr
    for row in done.values():  # every output a finished row names is whole
        assert all(nib.load(p).shape == (64, 64, 32) for p in row.outputs)

    again = ldseg_run(*args, "--steps", "40")
    assert again.returncode == 0, again.stderr
    assert f"already done: {len(done)} (manifest)" in again.stderr
    after = RunManifest(out).latest()
    assert sorted(statuses(out).values()) == ["ok"] * len(seeds)
    assert all(after[k].pid == r.pid and after[k].finished == r.finished for k, r in done.items())
    # The local engine keys rows the same way: the same settings there find everything done.
    local = ldseg_run(str(inputs), "-o", str(out), "--backend", "torch", "--threads", "1", "--steps", "40")
    assert local.returncode == 0 and f"already done: {len(seeds)} (manifest)" in local.stderr, local.stderr


def test_a_backend_the_workers_cannot_run_is_one_line_with_its_exit_code(tmp_path: Path):
    inputs = tmp_path / "in"
    phantoms(inputs, range(1))
    result = ldseg_run(str(inputs), "-o", str(tmp_path / "out"), "--engine", "ray", "--backend", "tensorrt")
    assert result.returncode == 6, result.stderr  # backend unavailable, found before any actor starts
    assert "ldseg-run: error: TensorRT is not installed" in result.stderr and "Traceback" not in result.stderr
