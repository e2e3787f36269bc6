"""ldseg-run --precision / --threads: a precision no candidate runs is refused with each reason
(exit 6), never silently lowered or raised; bad values are usage errors (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"LDSEG_CACHE": str(cache)} if cache is not None else {})}
    return subprocess.run([str(BIN / "ldseg-run"), *args], capture_output=True, text=True, timeout=600, env=env)


def test_fp16_on_the_torch_backend_on_cpu_is_refused_with_the_reason(tmp_path: Path) -> None:
    done = _run("--demo", "-o", str(tmp_path), "--precision", "fp16", "--backend", "torch", "--device", "cpu")
    assert done.returncode == 6, done.stderr
    assert "torch backend runs fp32, bf16 here, not fp16" in " ".join(done.stderr.split())
    assert not list(tmp_path.glob("*_seg.nii.gz"))


def test_bf16_on_the_torch_backend_runs_and_the_first_screen_says_the_gate(tmp_path: Path) -> None:
    args = ("--demo", "--precision", "bf16", "--backend", "torch", "--device", "cpu", "--threads", "1")
    first = _run(*args, "-o", str(tmp_path / "first"), cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    screen = " ".join((first.stdout + first.stderr).split())  # the first screen is on stderr
    assert "backend: torch on cpu, bf16 (asked for; bf16 gate: " in screen and "measured in" in screen
    assert list((tmp_path / "first").glob("*_seg.nii.gz"))
    second = _run(*args, "-o", str(tmp_path / "second"), cache=tmp_path / "cache")  # another process: cached
    assert second.returncode == 0 and "cached)" in " ".join(second.stderr.split())


def test_bad_precision_and_threads_are_usage_errors(tmp_path: Path) -> None:
    assert _run("--demo", "-o", str(tmp_path), "--precision", "fp64").returncode == 2
    done = _run("--demo", "-o", str(tmp_path), "--threads", "0")
    assert done.returncode == 2 and "--threads" in done.stderr
