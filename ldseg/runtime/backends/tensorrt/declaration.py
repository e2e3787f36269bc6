"""The tensorrt backend: runs an engine set (or a checkpoint's FP16 engines, exported and built into
the artifact cache for this GPU and the largest K asked) on a CUDA GPU, at the engines' precision and
up to the engines' largest batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldseg.errors import BackendUnavailable
from ldseg.runtime.backends.declaration import CHECKPOINT, ENGINES, Declaration, Made, Request
from ldseg.runtime.devices import device_index

if TYPE_CHECKING:
    from ldseg.runtime.artifacts.engines import Environment

BUNDLE_PRECISION = "fp16"  # what a checkpoint is exported to for TensorRT (validated like any bundle)


def environment(index: int = 0) -> Environment:
    """This machine's TensorRT version and GPU `index`; BackendUnavailable without either (tests fake this)."""
    from ldseg.runtime.backends.tensorrt.probe import detect_environment

    return detect_environment(index)


def _index(request: Request) -> int:
    index = device_index(request.device)
    assert index is not None  # DECLARATION.devices: cuda only
    return index


def probe(request: Request) -> str | None:
    """From a checkpoint: TensorRT and this GPU, before minutes of exporting and building. An engine
    set's own check (built for this GPU and TensorRT?) is the backend's, on loading it."""
    if request.source.kind != CHECKPOINT:
        return None
    try:
        environment(_index(request))
    except BackendUnavailable as exc:
        return str(exc)
    return None


def precisions(request: Request) -> tuple[str, ...]:
    if request.source.engines is None:
        return (BUNDLE_PRECISION,)
    from ldseg.runtime.artifacts.engines import read_engine_set

    return (read_engine_set(request.source.engines).precision,)


def capacity(request: Request) -> int | None:
    """An engine set's largest batch; engines built from a checkpoint are built for the K asked."""
    if request.source.engines is None:
        return None
    from ldseg.runtime.artifacts.engines import read_engine_set

    return read_engine_set(request.source.engines).max_batch


def make(request: Request) -> Made:
    from ldseg.runtime.artifacts.engines import read_engine_set
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend

    source, checkpoint_hash = request.source, None
    if source.engines is not None:
        path = source.engines
    else:
        assert source.artifacts is not None  # Declaration.runs: a checkpoint with the cache
        reference = source.reference()
        bundle = source.artifacts.bundle(reference, precision=BUNDLE_PRECISION)
        path = source.artifacts.engines(bundle, environment(_index(request)), max_batch=request.max_samples)
        checkpoint_hash = reference.sha256
    engine_set = read_engine_set(path)
    return Made(TensorRTBackend(path, request.device), engine_set.config, checkpoint_hash)


DECLARATION = Declaration(
    "tensorrt", (ENGINES, CHECKPOINT), ("cuda",), probe=probe, precisions=precisions, make=make, capacity=capacity
)
