"""A head start for a cold one-volume run: the first input is read and preprocessed on a thread
while the backend is chosen and built (importing the runtime, hash checks, compiling), instead of
after it. Reading needs only the model configuration, which a checkpoint's header (or a bundle's or
engine set's manifest) gives without loading anything.

    with head_start(first_path, cfg, series):   # ldseg-run, before it builds its Segmenter
        ...                                      # read_volume of that path takes the result

The result is taken once, by `prepare_input` for the same (path, configuration, series); anything
else reads as before. An input error raised on the thread is raised where the read would have
raised it, so a bad first file fails exactly as it did. Leaving the block drops an untaken result.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from ldseg.errors import LdsegError
from ldseg.model.config import ModelConfig
from ldseg.runs.volumes import Prepared, prepare
from ldseg.runtime.artifacts.source import source_config
from ldseg.runtime.volume_ops import VolumeOps

_Key = tuple[Path, ModelConfig, str | None]
_lock = threading.Lock()
_pending: dict[_Key, Future[Prepared]] = {}


@contextmanager
def head_start(path: Path, cfg: ModelConfig, series: str | None) -> Iterator[None]:
    key: _Key = (path, cfg, series)
    future: Future[Prepared] = Future()

    def read() -> None:
        try:
            future.set_result(prepare(path, cfg, series))
        except BaseException as exc:  # handed to whoever takes it, as the read would have raised it
            future.set_exception(exc)

    with _lock:
        _pending[key] = future
    # A daemon thread: a run that stops early (bad options, a failed export) does not wait for it.
    threading.Thread(target=read, name="ldseg-head-start", daemon=True).start()
    try:
        yield
    finally:
        with _lock:
            if _pending.get(key) is future:
                del _pending[key]


def head_start_for(
    paths: list[Path], checkpoint: str | None, bundle: Path | None, engines: Path | None, series: str | None
) -> AbstractContextManager[None]:
    """A head start on the first of `paths` for a model source as ldseg-run names it; none when
    there is no input or the source's header cannot be read (the backend's selection then says why)."""
    if not paths or paths[0].is_dir() or paths[0].suffix.lower() == ".dcm":
        # A DICOM series: its reader imports pydicom while the main thread may import highdicom (DICOM SEG
        # output), and two threads importing the same package can see it half-initialized.
        return nullcontext()
    try:
        cfg = source_config(checkpoint, bundle, engines)
    except (LdsegError, OSError, ValueError, KeyError):
        return nullcontext()
    return head_start(paths[0], cfg, series)


def prepare_input(path: Path, cfg: ModelConfig, series: str | None, ops: VolumeOps | None = None) -> Prepared:
    """`prepare(path, cfg, series, ops)`, or the head start's result for exactly these arguments
    (prepared on the CPU while the backend was built: the same image, see ldseg/runtime/volume_ops.py)."""
    with _lock:
        future = _pending.pop((path, cfg, series), None)
    return prepare(path, cfg, series, ops) if future is None else future.result()
