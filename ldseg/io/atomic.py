"""Atomic output writes: a reader never sees a half-written file, a failed write leaves nothing.

The data goes to a hidden temp file in the destination folder (same filesystem, so the final
`os.replace` is atomic), is fsynced, then renamed over the destination.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ldseg.errors import OutputError

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_ACCESS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# Double suffixes whose inner part selects the format (nibabel: .nii.gz -> gzipped NIfTI).
_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")


def _real_suffix(name: str) -> str:
    for suffix in _COMPOUND_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[-len(suffix) :]
    return Path(name).suffix


@functools.cache
def _umask() -> int:
    # mkstemp creates 0600 files; outputs should get the mode a plain open() would give.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error_errno(exc: BaseException) -> int | None:
    """errno of the first OSError in the exception chain (writers may wrap it)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur.errno
        cur = cur.__cause__ or cur.__context__
    return None


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Call `write(tmp)` on a hidden sibling temp file, then move it onto `path` atomically.

    Raises OutputError if `path` exists and not `overwrite`, if the disk or quota is full, or if
    the folder is not writable. Any other exception from `write` propagates unchanged; in every
    failure case (KeyboardInterrupt included) the temp file is removed.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists (use --overwrite)")
    suffix = _real_suffix(path.name)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: folder {parent} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=parent)
    except OSError as exc:
        mapped = _as_output_error(path, exc)
        raise mapped or OutputError(f"{path}: cannot write ({exc.strerror})") from exc
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        write(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        mapped = _as_output_error(path, exc)
        if mapped is not None:
            raise mapped from exc
        raise
    try:
        _fsync_path(parent, directory=True)  # make the rename itself durable
    except OSError:
        pass  # some filesystems refuse directory fsync; the data is already in place


def _as_output_error(path: Path, exc: BaseException) -> OutputError | None:
    """The user-facing error for a full disk or an unwritable folder; None leaves `exc` as is."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: never masked
        return None
    code = _os_error_errno(exc)
    if code in _NO_SPACE:
        return OutputError(f"{path}: no space left on device")
    if code is not None and code in _NO_ACCESS:
        return OutputError(f"{path}: cannot write ({os.strerror(code)})")
    return None


def disk_error(path: Path, exc: BaseException) -> OutputError | None:
    """OutputError naming `path` if `exc` (or an error it wraps) is a full disk or a refused write; else None."""
    return _as_output_error(path, exc)


def ensure_output_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed; OutputError if it is a file or cannot be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "no space left on device" if exc.errno in _NO_SPACE else exc.strerror
        raise OutputError(f"{path}: cannot create output directory ({reason})") from exc
    return path


# --------------------------------------------------------------------------- whole folders


def check_folder_target(target: Path, overwrite: bool, marker: str) -> None:
    """Refuse an existing target without `overwrite`, and never replace a folder that is not an
    artifact of the same kind (`marker` file inside), whatever `overwrite` says."""
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")
    if not overwrite:
        raise OutputError(f"{target}: exists (use --overwrite)")
    if any(target.iterdir()) and not (target / marker).is_file():
        raise OutputError(f"{target}: exists and has no {marker}; refusing to replace a folder ldseg did not write")


@contextlib.contextmanager
def staged_folder(target: Path | str, *, overwrite: bool, marker: str) -> Iterator[Path]:
    """Yield a hidden temp folder beside `target`; on success it replaces `target` by rename.

    A reader sees either the old folder or the complete new one; on any failure (including
    KeyboardInterrupt) the temp folder is removed and `target` is left as it was.
    """
    target = Path(target)
    check_folder_target(target, overwrite, marker)
    parent = ensure_output_dir(target.absolute().parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise OutputError(f"{target}: cannot write in {parent} ({exc.strerror})") from exc
    try:
        yield tmp
        for path in [*tmp.iterdir(), tmp]:
            _fsync(path)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700; give it a plain mkdir's mode
        check_folder_target(target, overwrite, marker)  # it may have appeared while we worked
        old: Path | None = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if old is not None:
                os.replace(old, target)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(f"{target}: appeared while writing; not replaced") from exc
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{target}: no space left on device") from exc
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
