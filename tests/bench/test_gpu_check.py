"""scripts/gpu_check.sh on a machine without a GPU: one line, exit 6, quickly; and the report's scoring."""

from __future__ import annotations

import json
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


# --------------------------------------------------------------------------- budget and report


class FakeClock:
    """Seconds that only move when a check says it spent them (no timed tests)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_check_gets_what_is_left_of_one_budget_and_later_ones_are_not_run(tmp_path):
    clock = FakeClock()
    checks = gpu_check.Checks(tmp_path, tmp_path / "out", budget_s=100, clock=clock, watchdog=False)
    seen = []

    def spends(seconds: float):  # type: ignore[no-untyped-def]
        def check() -> dict[str, str]:
            seen.append(checks.remaining())
            clock.now += seconds
            return {"status": "pass"}

        return check

    for name, seconds in (("a", 30), ("b", 60), ("c", 20), ("d", 1)):
        checks.run(name, spends(seconds))
    assert seen == [100, 70, 10]  # each check saw the remaining time; d found none left
    assert checks.results["d"]["status"] == "not run: time budget (110 s of 100 s spent)"


def test_the_report_is_rewritten_after_every_check(tmp_path):
    checks = gpu_check.Checks(tmp_path, tmp_path / "out", budget_s=60, watchdog=False)
    path = tmp_path / "out" / "gpu_check.json"
    seen = {}

    def second() -> dict[str, str]:
        seen.update(json.loads(path.read_text()))  # what a run killed now would leave
        return {"status": "pass"}

    checks.run("first", lambda: {"status": "pass", "value": 1})
    checks.run("second", second)
    assert seen["checks"]["first"]["value"] == 1 and seen["running"] == "second"
    assert seen["summary"]["finished"] is False and seen["schema"] == "ldseg-gpu-check/1"
    final = json.loads(path.read_text())
    assert set(final["checks"]) == {"first", "second"} and final["summary"]["pass"] == 2
    assert final["running"] is None and final["summary"]["finished"] is True


def test_the_watchdog_writes_the_report_and_exits_when_the_budget_runs_out(tmp_path):
    from ldseg.bench.gpu_check.report import WATCHDOG_EXIT, Watchdog

    checks = gpu_check.Checks(tmp_path, tmp_path / "out", budget_s=60, watchdog=False)
    checks.run("done", lambda: {"status": "pass"})
    exits: list[int] = []
    checks.report.running = "tensorrt_fp32"
    Watchdog(checks.report, exit=exits.append).fire("tensorrt_fp32")
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert exits == [WATCHDOG_EXIT]
    assert report["checks"]["done"]["status"] == "pass"  # what finished is kept
    stopped = report["checks"]["tensorrt_fp32"]
    assert stopped["status"] == "fail" and "time budget of 60 s ran out inside it" in stopped["error"]
    assert report["summary"]["fail"] == 1


def test_environment_survives_any_import_error(monkeypatch):
    import importlib

    from ldseg.bench.gpu_check import report

    real = importlib.import_module

    def failing(name: str, *args: object) -> object:
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file")  # a wheel without its library
        if name == "cuda.bindings":
            raise RuntimeError("anything at all")
        return real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(report.importlib, "import_module", failing)
    info = gpu_check.environment()
    assert info["tensorrt"].startswith("absent (OSError: libnvinfer.so.10")
    assert info["cuda.bindings"] == "absent (RuntimeError: anything at all)"
    assert info["torch"] != "" and "python" in info


def test_the_script_passes_output_resolved_from_where_it_was_called(tmp_path):
    """--output DIR is relative to the caller's directory, not to the repository the script cd's into."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\nif [ "$1" = "-" ]; then cat >/dev/null; exit 0; fi\necho "$@"\n')
    fake.chmod(0o755)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--output", "report-here", "--budget-s", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHON": str(fake), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert f"--output {tmp_path / 'report-here'} --budget-s 5" in done.stdout


@pytest.mark.skipif(gpu_check.no_gpu_reason() is None, reason="a GPU is visible: the real check would run")
def test_torch_reduced_precision_rows_say_why_they_did_not_run(tmp_path):
    checks = gpu_check.Checks(tmp_path, tmp_path / "out", budget_s=60, watchdog=False)
    for precision in ("bf16", "fp16"):
        checks.run(f"torch_{precision}", lambda p=precision: checks.torch_reduced(p))
        assert checks.results[f"torch_{precision}"]["status"] == "not run: no CUDA GPU visible to PyTorch"
    checks.run("torch_bf16_compiled", lambda: checks.torch_reduced("bf16", compile=True))
    assert checks.results["torch_bf16_compiled"]["status"] == "not run: no CUDA GPU visible to PyTorch"
