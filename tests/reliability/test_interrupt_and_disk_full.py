"""Ctrl-C and a full disk in the middle of a folder run: no partial or temp file is ever left,
each volume's outputs are all-or-nothing, the failure names the file, and the exit is non-zero.

Full disk is tested twice: a fault-injected writer (ENOSPC raised inside atomic_write, after it
has half-written its temp file) everywhere, and a real tiny tmpfs where mounting one works
(root, as CI runs; skipped elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import ldseg.runs.head_start as reading
from ldseg.errors import InputError, OutputError
from ldseg.model.config import PRESETS
from ldseg.runs.local import run_files
from ldseg.runs.types import RunOptions
from tests.helpers import ctrl_c_as_at_a_terminal, output_names
from tests.reliability.helpers import write_phantoms

CFG = PRESETS["demo"]
BIN = Path(sys.executable).parent
_real_save = nib.save


def _assert_complete_outputs(out_dir: Path, expected: set[str]) -> None:
    """Exactly `expected` in `out_dir`, no hidden temp file, and every file reads to the end."""
    names = set(output_names(out_dir))
    assert names == expected, f"unexpected files: {sorted(names ^ expected)}"
    for name in names:
        img = nib.load(out_dir / name)
        assert np.asarray(img.dataobj).shape == img.shape  # full payload (gzip CRC checked)


def _failing_save(fail: callable, exc: BaseException):  # type: ignore[valid-type]
    """nib.save that half-writes its (temp) file and then raises `exc` when fail(name) says so."""
    calls: list[str] = []

    def save(img, filename, *args, **kwargs):
        name = Path(filename).name
        calls.append(name)
        if fail(name, len(calls)):
            Path(filename).write_bytes(b"\x1f\x8b\x08\x00partial")  # what a full disk leaves
            raise exc
        return _real_save(img, filename, *args, **kwargs)

    return save, calls


@pytest.fixture()
def inputs(tmp_path: Path) -> list[Path]:
    return write_phantoms(tmp_path / "in", 3, tmp_path / "truth")


def _disk_full_at(monkeypatch: pytest.MonkeyPatch, out: Path, temp_prefix: str) -> list[str]:
    """Make `out` and fill the disk when nibabel saves a temp file starting with `temp_prefix`."""
    out.mkdir()
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    save, calls = _failing_save(lambda name, n: name.startswith(temp_prefix), enospc)
    monkeypatch.setattr(nib, "save", save)
    return calls


def test_disk_full_fails_that_volume_only(inputs, demo_backend, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = _disk_full_at(monkeypatch, out, ".p1_seg.")
    events: list[tuple[str, str | None]] = []
    summary = run_files(
        inputs,
        out,
        demo_backend,
        CFG,
        RunOptions(steps=2),
        on_done=lambda path, error: events.append((path.name, error)),
    )

    assert [name for name, _ in events] == ["p0.nii.gz", "p1.nii.gz", "p2.nii.gz"]  # went on
    assert len(summary.failures) == 1
    path, error = summary.failures[0]
    assert path == inputs[1] and isinstance(error, OutputError) and error.exit_code == 5
    assert str(error) == f"{out / 'p1_seg.nii.gz'}: no space left on device"
    assert events[1][1] == str(error)
    assert any(c.startswith(".p1_seg.") for c in calls), "the temp file was written to"
    _assert_complete_outputs(out, {"p0_seg.nii.gz", "p2_seg.nii.gz"})
    assert summary.written == [out / "p0_seg.nii.gz", out / "p2_seg.nii.gz"]


def test_disk_full_between_maps_removes_the_volumes_other_maps(inputs, demo_backend, tmp_path, monkeypatch):
    """--samples 2 writes _seg, _confidence, _entropy: the disk fills on p0's second map."""
    out = tmp_path / "out"
    _disk_full_at(monkeypatch, out, ".p0_confidence.")
    summary = run_files(inputs[:2], out, demo_backend, CFG, RunOptions(steps=2, samples=2))

    assert [(p.name, type(e)) for p, e in summary.failures] == [("p0.nii.gz", OutputError)]
    assert "no space left on device" in str(summary.failures[0][1])
    p1 = {"p1_seg.nii.gz", "p1_confidence.nii.gz", "p1_entropy.nii.gz"}
    _assert_complete_outputs(out, p1)  # no p0_seg left behind without its uncertainty maps
    assert {p.name for p in summary.written} == p1


def test_ctrl_c_inside_a_write_leaves_no_partial_file(inputs, demo_backend, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    save, _ = _failing_save(lambda name, n: name.startswith(".p1_seg."), KeyboardInterrupt())
    monkeypatch.setattr(nib, "save", save)
    with pytest.raises(KeyboardInterrupt):  # never swallowed or turned into a failure line
        run_files(inputs, out, demo_backend, CFG, RunOptions(steps=2))
    _assert_complete_outputs(out, {"p0_seg.nii.gz"})


def test_unexpected_reader_error_fails_only_that_file(inputs, demo_backend, tmp_path, monkeypatch):
    """A reader bug on one odd file (here a RuntimeError) must not end a run of thousands."""
    real_prepare = reading.prepare

    def prepare(path, cfg, series=None, ops=None):
        if path.name == "p0.nii.gz":
            raise RuntimeError("boom\nsecond line")
        return real_prepare(path, cfg, series, ops)

    monkeypatch.setattr(reading, "prepare", prepare)  # what read_volume reads through
    out = tmp_path / "out"
    out.mkdir()
    summary = run_files(inputs[:2], out, demo_backend, CFG, RunOptions(steps=2))
    [(path, error)] = summary.failures
    assert path == inputs[0] and isinstance(error, InputError)
    assert str(error) == f"{inputs[0]}: unexpected error reading the file (RuntimeError: boom second line)"
    _assert_complete_outputs(out, {"p1_seg.nii.gz"})


# --------------------------------------------------------------------------- through the CLI


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # Wide COLUMNS: Rich would otherwise fold each failure line at 80 columns (see test_cli_messages).
    env = {**os.environ, "COLUMNS": "10000"}
    return subprocess.run([str(BIN / "ldseg-run"), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_sigint_stops_a_folder_run_cleanly(demo_checkpoint, tmp_path):
    write_phantoms(tmp_path / "in", 4, tmp_path / "truth")
    out = tmp_path / "out"
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [
            str(BIN / "ldseg-run"),
            str(tmp_path / "in"),
            "-o",
            str(out),
            "--checkpoint",
            str(demo_checkpoint),
            "--backend",
            "torch",
            "--steps",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        preexec_fn=ctrl_c_as_at_a_terminal,
    )
    try:
        deadline = time.monotonic() + 400
        while not list(out.glob("*_seg.nii.gz")):
            assert proc.poll() is None, "the run ended before its first output"
            assert time.monotonic() < deadline, "no output after 400 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert rc in (130, -signal.SIGINT), (rc, stderr)  # 130: Typer's exit for KeyboardInterrupt
    assert "Traceback" not in stderr, stderr
    done = set(output_names(out))
    assert done and all(name.endswith("_seg.nii.gz") for name in done)
    _assert_complete_outputs(out, done)


@contextlib.contextmanager
def _tiny_tmpfs(mountpoint: Path, size: str = "256k") -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the fault-injected writer covers ENOSPC")
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); fault injection covers ENOSPC")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the filesystem of `folder` to the last byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 512, 64, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_full_tmpfs_through_the_cli(demo_checkpoint, tmp_path):
    write_phantoms(tmp_path / "in", 2, tmp_path / "truth")
    with _tiny_tmpfs(tmp_path / "disk") as disk:
        filler = _fill(disk)
        args = (
            str(tmp_path / "in"),
            "-o",
            str(disk),
            "--checkpoint",
            str(demo_checkpoint),
            "--backend",
            "torch",
            "--steps",
            "2",
        )
        full = _cli(*args)
        assert full.returncode == 5, full.stderr
        for name in ("p0_seg.nii.gz", "p1_seg.nii.gz"):
            assert f"{disk / name}: no space left on device" in full.stderr
        assert "2 of 2 input(s) failed" in full.stderr and "Traceback" not in full.stderr
        assert output_names(disk) == ["filler"], "a partial or temp file was left"
        assert "the run manifest is incomplete" in full.stderr  # it could not be written either

        filler.unlink()  # space again: the same command now succeeds
        again = _cli(*args)
        assert again.returncode == 0, again.stderr
        _assert_complete_outputs(disk, {"p0_seg.nii.gz", "p1_seg.nii.gz"})
