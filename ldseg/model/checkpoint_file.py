"""A checkpoint file's header and content hash, read without PyTorch.

The runtime keys its artifact cache by a checkpoint's verified content hash and plans outputs from
its config; neither needs the model, so neither needs torch (a runtime-only install has none). The
digest is the same one ldseg.model.checkpoint writes: names, torch dtype names, shapes and bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from ldseg.errors import ArtifactError

FORMAT = "ldseg-checkpoint/1"


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes (as torch names them: torch.float32), shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]  # shape from the array itself: ascontiguousarray makes 0-d arrays 1-d
        digest.update(f"{name}|torch.{a.dtype.name}|{tuple(a.shape)}|".encode())
        digest.update(a.tobytes(order="C"))
    return digest.hexdigest()


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="numpy") as handle:
            raw = (handle.metadata() or {}).get("ldseg")
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
    if raw is None:
        raise ArtifactError(f"{path}: safetensors file without ldseg metadata; not an ldseg checkpoint")
    meta: dict[str, Any] = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def verified_metadata(path: Path | str) -> dict[str, Any]:
    """The header of a checkpoint whose tensors match its content hash (ArtifactError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, TypeError) as exc:  # TypeError: a dtype numpy lacks (bf16)
        raise ArtifactError(f"{path}: checkpoint tensors unreadable ({exc})") from exc
    if digest_arrays(arrays) != meta.get("content_sha256"):
        raise ArtifactError(f"{path}: content hash mismatch (file altered or truncated)")
    return meta
