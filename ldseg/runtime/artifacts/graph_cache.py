"""The small weightless graphs (ldseg/runtime/volume_graphs.py, sample_graphs.py) serialized in the
artifact cache, so that ONNX Runtime's sessions for them start from bytes: building one imports onnx
(0.6 s on a 2-core CPU, most of it ml_dtypes) and checks the graph, which a cold one-volume run on a
GPU would otherwise pay on its first volume.

An entry is `graphs/<name>-<digest>.onnx`: the graph's name with its arguments, and the digest of
the two builder modules' source (code_digest), so a changed builder makes a new entry and a stale
graph is never read. The cache only saves time: an entry that cannot be read is built again, and
one that cannot be written (a read-only or full cache) is not kept. Where the sources are not on
disk (a bytecode-only install) nothing is cached.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ldseg.errors import OutputError
from ldseg.io.atomic import atomic_write
from ldseg.runtime.artifacts.cache import GRAPHS, cache_root
from ldseg.runtime.artifacts.code_digest import code_digest

BUILDERS = ("runtime/volume_graphs.py", "runtime/sample_graphs.py")


def builders_digest() -> str | None:
    """The digest of the builders' source (code_digest); None without the sources."""
    return code_digest(*BUILDERS)


def entry_path(name: str, root: Path | None = None) -> Path | None:
    digest = builders_digest()
    return None if digest is None else (root or cache_root()) / GRAPHS / f"{name}-{digest}.onnx"


def cached_graph(name: str, build: Callable[[], bytes], root: Path | None = None, *, fresh: bool = False) -> bytes:
    """The serialized graph `name`: read from the cache, or built now (and kept there if it can be);
    fresh: built now whatever the cache holds (in place of an entry its reader found damaged)."""
    path = entry_path(name, root)
    if path is not None and not fresh:
        try:
            return path.read_bytes()
        except OSError:
            pass  # not there yet (or unreadable): built below
    data = build()
    if path is not None:
        keep(path, data)
    return data


def keep(path: Path, data: bytes) -> None:
    """Write an entry atomically (two processes racing write the same bytes); silently not at all
    where the cache cannot take it."""

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write, overwrite=True)
    except (OSError, OutputError):
        pass
