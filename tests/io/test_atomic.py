from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ldseg.errors import OutputError
from ldseg.io.atomic import atomic_write, ensure_output_dir


def _write_text(text: str):
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    return write


def test_writes_and_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write(target, _write_text("hello"), overwrite=False)
    assert target.read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_temp_file_is_hidden_sibling_with_real_suffix(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"x")

    atomic_write(tmp_path / "case1.nii.gz", write, overwrite=False)
    (tmp,) = seen
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".case1.")
    assert tmp.name.endswith(".nii.gz")  # nibabel chooses gzip from the suffix


def test_refuses_existing_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OutputError, match=r"exists \(use --overwrite\)") as info:
        atomic_write(target, _write_text("new"), overwrite=False)
    assert str(target) in str(info.value)
    assert target.read_text() == "old"
    atomic_write(target, _write_text("new"), overwrite=True)
    assert target.read_text() == "new"


def test_file_mode_follows_umask(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write(target, _write_text("x"), overwrite=False)
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()])
def test_failing_writer_leaves_no_temp_and_keeps_old(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "out.nii.gz"
    target.write_text("old")

    def write(tmp: Path) -> None:
        tmp.write_text("partial")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, write, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    assert target.read_text() == "old"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_is_output_error(tmp_path: Path, code: int) -> None:
    target = tmp_path / "seg.nii.gz"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise OSError(code, os.strerror(code))

    with pytest.raises(OutputError, match="no space left on device") as info:
        atomic_write(target, write, overwrite=False)
    assert str(target) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_wrapped_disk_full_is_output_error(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("writer failed") from exc

    with pytest.raises(OutputError, match="no space left"):
        atomic_write(tmp_path / "x.png", write, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_is_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        atomic_write(tmp_path / "nope" / "x.txt", _write_text("x"), overwrite=False)


def test_ensure_output_dir(tmp_path: Path) -> None:
    made = ensure_output_dir(tmp_path / "a" / "b")
    assert made.is_dir()
    assert ensure_output_dir(made) == made  # idempotent
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        ensure_output_dir(blocker)
