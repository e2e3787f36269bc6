"""One registry that turns (model source, backend name, device) into a Backend, and says why."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.model.checkpoint import load_checkpoint
from ldseg.model.network import LDSeg
from ldseg.runtime.backend import Backend
from ldseg.runtime.torch_backend import TorchBackend

SEGMENT_NEEDS = ("image_encoder", "denoiser", "label_decoder")
RECONSTRUCT_NEEDS = ("label_encoder", "label_decoder")


def demo_checkpoint_path() -> Path:
    return Path(str(resources.files("ldseg.data") / "demo.safetensors"))


def resolve_checkpoint(name: str | Path) -> Path:
    """`demo` names the bundled model; anything else is a path."""
    path = demo_checkpoint_path() if str(name) == "demo" else Path(name)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    return path


def load_model(checkpoint: str | Path, needs: tuple[str, ...] = SEGMENT_NEEDS) -> LDSeg:
    path = resolve_checkpoint(checkpoint)
    model = load_checkpoint(path)
    missing = model.untrained(needs)
    if missing:
        raise ArtifactError(
            f"{path}: component(s) {', '.join(missing)} hold no trained weights "
            "(the official release has no denoiser: train one with ldseg-train)"
        )
    return model


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: no CUDA GPU is visible to PyTorch")
    return device


def select_backend(model: LDSeg, backend: str, device: str) -> tuple[Backend, str]:
    """The chosen backend and a sentence saying why."""
    device = resolve_device(device)
    if backend in ("torch", "auto"):
        why = "asked for" if backend == "torch" else "auto: checkpoint given (no bundle or engines), PyTorch runs it"
        return TorchBackend(model, device), why
    raise BackendUnavailable(f"backend {backend!r} needs an exported bundle (--bundle) or engines (--engines)")
