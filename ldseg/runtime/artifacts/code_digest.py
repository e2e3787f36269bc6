"""Digests of ldseg's own source files, for cache entries that the code made and that other code
would make differently (the serialized small graphs, the torch precision gate's verdicts): a changed
file gives a new key, so an entry made by other code is never read.

None where the sources are not on disk (a bytecode-only install): callers then keep nothing.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2]  # the ldseg folder (not `import ldseg`: that is the API)


@functools.cache
def code_digest(*parts: str) -> str | None:
    """The first 16 hex digits of the SHA-256 of `parts` (paths below the ldseg package: a .py file,
    or a folder standing for the .py files directly in it), names and contents; None if any is missing."""
    digest = hashlib.sha256()
    for part in parts:
        path = PACKAGE / part
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        if not files:
            return None
        for file in files:
            try:
                data = file.read_bytes()
            except OSError:
                return None
            digest.update(file.relative_to(PACKAGE).as_posix().encode() + b"\0" + data)
    return digest.hexdigest()[:16]
