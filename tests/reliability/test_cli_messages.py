"""What a script sees from ldseg-run: exit codes (README "Errors and exit codes") and one
greppable line per failed input, also when stderr is a log file rather than a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.reliability.helpers import write_phantoms

BIN = Path(sys.executable).parent


def _run(*args: str, columns: str | None = "10000") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run([str(BIN / "ldseg-run"), *args], capture_output=True, text=True, timeout=600, env=env)


def test_mixed_failure_kinds_exit_1(demo_checkpoint, tmp_path):
    [good] = write_phantoms(tmp_path / "in", 1, tmp_path / "truth")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")  # 3: bad input
    out = tmp_path / "out"
    out.mkdir()
    (out / "p0_seg.nii.gz").write_bytes(b"kept")  # 5: output exists
    result = _run(
        str(tmp_path / "in"), "-o", str(out), "--checkpoint", str(demo_checkpoint), "--backend", "torch", "--steps", "1"
    )
    assert result.returncode == 1, result.stderr
    assert "2 of 2 input(s) failed" in result.stderr
    assert (out / "p0_seg.nii.gz").read_bytes() == b"kept"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--samples", "0"), 2),  # Typer usage error
        (("--no-such-option",), 2),
        ((), 2),  # no inputs and no --demo
        (("--backend", "tensorrt", "--device", "cpu"), 6),  # a checkpoint runs on every backend, not this one
        (("--device", "cuda"), 6),
        (("--checkpoint", "/nonexistent.safetensors"), 4),
    ],
    ids=["samples-0", "unknown-option", "no-inputs", "tensorrt-on-cpu", "no-cuda", "no-checkpoint"],
)
def test_exit_codes(args, code, demo_checkpoint, tmp_path):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: --device cuda is legal here")
    checkpoint = () if "--checkpoint" in args else ("--checkpoint", str(demo_checkpoint))
    inputs = ("--demo",) if code in (4, 6) else ()
    result = _run(*inputs, *checkpoint, *args, "-o", str(tmp_path / "out"))
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr


def test_each_failure_is_one_exact_line_in_a_log(demo_checkpoint, tmp_path):
    """stderr redirected to a file (no terminal, no COLUMNS): each bad file is one line that
    starts with 'failed: <its path>: ', even for long paths and names with brackets."""
    folder = tmp_path / "in"
    [good] = write_phantoms(folder, 1, tmp_path / "truth")
    good = good.rename(folder / ("good[b]_" + "long_name_" * 8 + ".nii.gz"))
    bad = [folder / "scan[i]2.nii.gz", folder / ("a_rather_long_file_name_" * 4 + ".nii.gz")]
    for path in bad:
        path.write_bytes(b"not a volume")
    # nibabel logs header fixes on its own stderr handler, a line that names no file
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((8, 8, 8))
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = -5
    bad.append(folder / "negative_offset.nii")
    bad[-1].write_bytes(hdr.binaryblock + bytes(4 + 8**3 * 2))
    out = tmp_path / "out"
    result = _run(
        str(folder),
        "-o",
        str(out),
        "--checkpoint",
        str(demo_checkpoint),
        "--backend",
        "torch",
        "--steps",
        "1",
        columns=None,
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.splitlines()
    for path in bad:
        assert any(line.startswith(f"failed: {path}: not a readable NIfTI") for line in lines), (path, result.stderr)
    assert "ldseg-run: error: 3 of 4 input(s) failed (listed above and in the run manifest)" in lines
    assert all(line.startswith("failed: ") for line in lines if "too low" in line), result.stderr
    # stdout lists the written outputs, one path a line, for scripts to pick up
    assert result.stdout.splitlines() == [str(out / good.name.replace(".nii.gz", "_seg.nii.gz"))]
