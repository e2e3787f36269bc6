"""One registry that turns (model source, backend name, device) into a Backend, and says why.

Sources: a checkpoint (torch), a bundle (onnxruntime), an engine set (tensorrt). `auto` prefers,
in order, TensorRT (engines given, TensorRT importable, engines built for this GPU), ONNX Runtime on
CUDA, PyTorch on CUDA, ONNX Runtime on CPU, PyTorch on CPU — among what the given source can run.
Backends import lazily: a machine without onnxruntime-gpu or TensorRT never loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.model.checkpoint import load_checkpoint
from ldseg.model.config import ModelConfig
from ldseg.model.network import LDSeg
from ldseg.runtime.backend import Backend

SEGMENT_NEEDS = ("image_encoder", "denoiser", "label_decoder")
RECONSTRUCT_NEEDS = ("label_encoder", "label_decoder")
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def demo_checkpoint_path() -> Path:
    return Path(str(resources.files("ldseg.data") / "demo.safetensors"))


def resolve_checkpoint(name: str | Path) -> Path:
    """`demo` names the bundled model; anything else is a path."""
    path = demo_checkpoint_path() if str(name) == "demo" else Path(name)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    return path


def _refuse_untrained(source: Path, trained: dict[str, bool], needs: tuple[str, ...]) -> None:
    missing = [name for name in needs if not trained.get(name, False)]
    if missing:
        raise ArtifactError(
            f"{source}: component(s) {', '.join(missing)} hold no trained weights "
            "(the official release has no denoiser: train one with ldseg-train)"
        )


def load_model(checkpoint: str | Path, needs: tuple[str, ...] = SEGMENT_NEEDS) -> LDSeg:
    path = resolve_checkpoint(checkpoint)
    model = load_checkpoint(path)
    _refuse_untrained(path, model.trained, needs)
    return model


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise BackendUnavailable(f"--device {device}: choose cpu, cuda or auto")
    if device == "cuda" and not cuda_available():
        raise BackendUnavailable("--device cuda: no CUDA GPU is visible to PyTorch")
    return device


@dataclass(frozen=True)
class Source:
    """Exactly one of checkpoint, bundle, engines."""

    checkpoint: str | None = None
    bundle: Path | None = None
    engines: Path | None = None
    trust_unvalidated: bool = False  # load a bundle whose manifest records no passed validation


@dataclass
class Selection:
    backend: Backend
    config: ModelConfig
    why: str


def _torch(source: Source, device: str) -> Selection:
    from ldseg.runtime.torch_backend import TorchBackend

    if source.checkpoint is None:
        raise BackendUnavailable("the torch backend runs a checkpoint (--checkpoint)")
    model = load_model(source.checkpoint)
    return Selection(TorchBackend(model, device), model.cfg, "")


def _onnxruntime(source: Source, device: str) -> Selection:
    from ldseg.runtime.bundle import load_bundle
    from ldseg.runtime.onnxruntime_backend import OnnxRuntimeBackend

    if source.bundle is None:
        raise BackendUnavailable("the onnxruntime backend runs an exported bundle (--bundle)")
    bundle = load_bundle(source.bundle, trust_unvalidated=source.trust_unvalidated)
    _refuse_untrained(source.bundle, dict(bundle.trained), SEGMENT_NEEDS)
    return Selection(OnnxRuntimeBackend(bundle, device), bundle.config, "")


def _tensorrt(source: Source, device: str) -> Selection:
    from ldseg.runtime.engines import read_engine_set
    from ldseg.runtime.tensorrt_backend import TensorRTBackend

    if source.engines is None:
        raise BackendUnavailable("the tensorrt backend runs an engine set (--engines)")
    if device != "cuda":
        raise BackendUnavailable("the tensorrt backend needs --device cuda (or auto on a GPU machine)")
    engine_set = read_engine_set(source.engines)
    return Selection(TensorRTBackend(source.engines, device), engine_set.config, "")


_FACTORIES = {"torch": _torch, "onnxruntime": _onnxruntime, "tensorrt": _tensorrt}


def _auto_candidates(source: Source, gpu: bool) -> list[tuple[str, str]]:
    order = []
    if source.engines is not None and gpu:
        order.append(("tensorrt", "cuda"))
    if source.bundle is not None and gpu:
        order.append(("onnxruntime", "cuda"))
    if source.checkpoint is not None and gpu:
        order.append(("torch", "cuda"))
    if source.bundle is not None:
        order.append(("onnxruntime", "cpu"))
    if source.checkpoint is not None:
        order.append(("torch", "cpu"))
    return order


def select_backend(source: Source, backend: str = "auto", device: str = "auto") -> Selection:
    """The chosen backend, its model config, and a sentence saying why."""
    given = [s for s in (source.checkpoint, source.bundle, source.engines) if s is not None]
    if len(given) != 1:
        raise BackendUnavailable("give exactly one of --checkpoint, --bundle, --engines")
    if backend not in BACKENDS:
        raise BackendUnavailable(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        selection = _FACTORIES[backend](source, resolve_device(device))
        selection.why = "asked for"
        return selection
    if device != "auto":
        resolve_device(device)
    gpu = cuda_available() and device != "cpu"
    skipped: list[str] = []
    for name, dev in _auto_candidates(source, gpu):
        try:
            selection = _FACTORIES[name](source, dev)
        except BackendUnavailable as exc:  # announced, then the next candidate
            skipped.append(f"{name}/{dev}: {exc}")
            continue
        reasons = "; ".join(skipped) or "first available"
        selection.why = f"auto: {reasons}" if skipped else f"auto: {reasons} for this source on {'a GPU' if gpu else 'CPU'}"
        return selection
    raise BackendUnavailable("no backend can run this source here: " + "; ".join(skipped))

