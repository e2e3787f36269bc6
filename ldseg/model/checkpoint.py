"""Checkpoints: one safetensors file whose header metadata carries the JSON config.

The header and the content hash can be read without torch (ldseg.model.checkpoint_file: the
runtime's way); this module loads and saves the PyTorch model. Keeping the config inside the
safetensors header (rather than a sidecar .json) means a checkpoint is one file that cannot lose
its config; `ldseg-export inspect` prints it. Never pickles.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldseg.errors import ArtifactError
from ldseg.io.atomic import atomic_write
from ldseg.model.checkpoint_file import FORMAT, read_metadata
from ldseg.model.config import ModelConfig
from ldseg.model.network import COMPONENTS, LDSeg


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def state_tensors(model: LDSeg) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("step.")}


def save_checkpoint(model: LDSeg, path: Path, *, overwrite: bool, extra: dict[str, Any] | None = None) -> str:
    tensors = state_tensors(model)
    digest = tensors_hash(tensors)
    meta = {
        "format": FORMAT,
        "config": model.cfg.to_dict(),
        "trained": model.trained,
        "content_sha256": digest,
        **(extra or {}),
    }
    atomic_write(
        Path(path),
        lambda tmp: save_file(tensors, str(tmp), metadata={"ldseg": json.dumps(meta, sort_keys=True)}),
        overwrite=overwrite,
    )
    return digest


def verify_checkpoint(path: Path | str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header metadata and tensors of a checkpoint whose content hash matches its header
    (ArtifactError otherwise): enough to key a cache without building the model."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"{path}: checkpoint tensors unreadable ({exc})") from exc
    digest = tensors_hash(tensors)
    if digest != meta.get("content_sha256"):
        raise ArtifactError(f"{path}: content hash mismatch (file altered or truncated)")
    return meta, tensors


def load_checkpoint(path: Path | str) -> LDSeg:
    path = Path(path)
    meta, tensors = verify_checkpoint(path)
    digest = str(meta["content_sha256"])
    cfg = ModelConfig.from_dict(meta["config"])
    model = LDSeg(cfg, trained={k: bool(meta.get("trained", {}).get(k)) for k in COMPONENTS})
    expected = state_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{path}: tensors do not fit preset {cfg.preset!r} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ArtifactError(
                f"{path}: {name} has shape {tuple(t.shape)}, preset expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    model.checkpoint_hash = digest
    return model.eval()
