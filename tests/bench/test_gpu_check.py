"""scripts/gpu_check.sh on a machine without a GPU: one line, exit 6, quickly; and the report's scoring."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ldseg.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(gpu_check.no_gpu_reason() is None, reason="a GPU is visible: the real check would run")
def test_without_a_gpu_it_exits_quickly_with_one_line():
    clock = time.perf_counter()
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )
    assert done.returncode == 6, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU here (PyTorch: ")
    assert "cuda-python: " in lines[0] and done.stdout == ""
    assert time.perf_counter() - clock < 60


def test_an_unprepared_folder_is_named(tmp_path):
    with pytest.raises(SystemExit, match="is not prepared: run `bash scripts/gpu_check.sh --prepare`"):
        gpu_check.run_checks(tmp_path / "nothing", tmp_path / "out")


def test_agreement_is_scored_per_phantom_against_its_target(tmp_path):
    truth = np.zeros((4, 2, 4, 4), np.uint8)
    truth[:, :, :2] = 1
    np.savez_compressed(
        tmp_path / "phantoms.npz", seeds=np.arange(4), images=np.zeros((4, 1, 2, 4, 4), np.float32), truth=truth
    )
    checks = gpu_check.Checks(tmp_path, tmp_path / "out", budget_s=60)
    checks.reference = truth.copy()
    assert checks.scored(truth.copy())["status"] == "pass"
    off = truth.copy()
    off[2, 0, 0, 0] = 0  # one voxel of 32 on one phantom: 96.9 %, under every target
    result = checks.scored(off, "int8")
    assert result["status"] == "fail" and result["agreement_per_phantom"][2] == pytest.approx(31 / 32)
    assert result["dice_vs_truth"][0] == {"1": 1.0}


def test_a_failing_check_is_recorded_and_the_next_one_runs(tmp_path):
    checks = gpu_check.Checks(tmp_path, tmp_path, budget_s=60)
    checks.run("broken", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    checks.run("fine", lambda: {"status": "pass"})
    assert checks.results["broken"]["status"] == "fail" and "ZeroDivisionError" in checks.results["broken"]["error"]
    assert checks.results["fine"]["status"] == "pass"
    late = gpu_check.Checks(tmp_path, tmp_path, budget_s=-1)
    late.run("pending", lambda: {"status": "pass"})
    assert late.results["pending"]["status"].startswith("not run: time budget")
