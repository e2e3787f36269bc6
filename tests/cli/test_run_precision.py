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


def test_bf16_on_the_torch_backend_is_refused_with_the_reason(tmp_path: Path) -> None:
    # (with the artifact cache a checkpoint also runs on OpenVINO, which does run BF16 where the CPU has it)
    done = _run("--demo", "-o", str(tmp_path), "--precision", "bf16", "--backend", "torch", "--device", "cpu")
    assert done.returncode == 6, done.stderr
    assert "torch backend runs fp32 here, not bf16" in " ".join(done.stderr.split())
    assert not list(tmp_path.glob("*_seg.nii.gz"))


def test_bad_precision_and_threads_are_usage_errors(tmp_path: Path) -> None:
    assert _run("--demo", "-o", str(tmp_path), "--precision", "fp64").returncode == 2
    done = _run("--demo", "-o", str(tmp_path), "--threads", "0")
    assert done.returncode == 2 and "--threads" in done.stderr
