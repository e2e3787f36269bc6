"""ldseg-run --volume-ops: `auto` does pre/post-processing where the backend offers it (the torch
backend: its torch ops, on the CPU too), `cpu` on the CPU reference path (numpy/scipy) whatever the
backend offers; the first screen says which, the labels are the same (the torch ops are bit-equal to
scipy on these phantoms), and a bad value is a usage error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldseg.api import Segmenter

BIN = Path(sys.executable).parent
TORCH_CPU = ("--backend", "torch", "--device", "cpu", "--threads", "1", "--steps", "3")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ldseg-run"), *args], capture_output=True, text=True, timeout=600, env=dict(os.environ)
    )


def test_volume_ops_cpu_takes_the_reference_path_and_says_so(tmp_path: Path) -> None:
    screens, labels = {}, {}
    for where in ("auto", "cpu"):
        done = _run("--demo", *TORCH_CPU, "--volume-ops", where, "-o", str(tmp_path / where))
        assert done.returncode == 0, done.stderr
        screens[where] = " ".join(done.stderr.split())
        (seg,) = sorted((tmp_path / where).glob("*_seg.nii.gz"))
        labels[where] = np.asarray(nib.load(seg).dataobj)
    assert "pre/post-processing: torch ops on cpu" in screens["auto"]
    assert "pre/post-processing: cpu (numpy/scipy): --volume-ops cpu" in screens["cpu"]
    assert len(np.unique(labels["cpu"])) > 1
    np.testing.assert_array_equal(labels["auto"], labels["cpu"])
    assert _run("--demo", "--volume-ops", "gpu", "-o", str(tmp_path / "bad")).returncode == 2


def test_the_api_takes_it_too() -> None:
    with Segmenter(backend="torch", device="cpu", volume_ops="cpu", warn_demo=False) as seg:
        assert seg.backend.volume_ops() is None and seg.backend.device_volume_ops() is not None
    with Segmenter(backend="torch", device="cpu", warn_demo=False) as seg:
        assert seg.backend.volume_ops() is seg.backend.device_volume_ops() is not None
    with pytest.raises(ValueError, match="--volume-ops"):
        Segmenter(volume_ops="gpu")
