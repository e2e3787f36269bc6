"""Listing and clearing the artifact cache (`ldseg-export cache list|clear`): entries, their size and
last use; an entry being built by another process is left alone."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import filelock

from ldseg.runtime.artifacts.cache import GRAPHS, KINDS, LOCK_SUFFIX, TENSORRT, cache_root, remove_entry


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "bundles", "engines", "tensorrt" (timing caches), "graphs", "partial" (a build that died)
    name: str
    path: Path
    bytes: int
    last_used: float  # POSIX time


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry under the root, most recently used first (leftovers of killed builds as "partial")."""
    root = root or cache_root()
    found: list[CacheEntry] = []
    for kind in (*KINDS, TENSORRT, GRAPHS):
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.endswith(LOCK_SUFFIX):
                continue
            label = "partial" if path.name.startswith(".") else kind
            found.append(CacheEntry(label, path.name, path, _size(path), path.stat().st_mtime))
    return sorted(found, key=lambda e: -e.last_used)


def clear(
    root: Path | None = None, *, older_than_days: float | None = None
) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove entries (those unused for more than `older_than_days`, if given); returns (removed, busy).

    An entry being built right now (its lock held by another process) is left alone and reported busy.
    """
    root = root or cache_root()
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    removed: list[CacheEntry] = []
    busy: list[CacheEntry] = []
    for entry in list_entries(root):
        if cutoff is not None and entry.last_used >= cutoff:
            continue
        owner = _owner_name(entry.name) if entry.kind == "partial" else entry.name
        lock = filelock.FileLock(str(entry.path.parent / f"{owner}{LOCK_SUFFIX}"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            busy.append(entry)
            continue
        try:
            remove_entry(entry.path)
            removed.append(entry)
        finally:
            lock.release()  # lock files stay: unlinking one a waiter holds open would break the exclusion
    return removed, busy


def _owner_name(staged: str) -> str:
    """The entry a staged folder belongs to: `.NAME.xxxxxx.tmp` / `.NAME.xxxxxx.old` -> NAME."""
    body = staged[1:]
    for suffix in (".tmp", ".old"):
        if body.endswith(suffix):
            body = body[: -len(suffix)]
    return body.rsplit(".", 1)[0] if "." in body else body
