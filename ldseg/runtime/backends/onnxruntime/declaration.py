"""The onnxruntime backend: runs a bundle (or a checkpoint's FP32 bundle from the artifact cache) on
the CPU or, with onnxruntime-gpu, a CUDA GPU, at the precision the bundle holds."""

from __future__ import annotations

import importlib.util

from ldseg.runtime.artifacts.source import SEGMENT_NEEDS, bundle_path, bundle_precision, refuse_untrained
from ldseg.runtime.backends.declaration import BUNDLE, CHECKPOINT, Declaration, Made, Request


def probe(request: Request) -> str | None:
    """onnxruntime is installed and, on a GPU, offers its CUDA provider (checked before any export)."""
    if request.on_gpu:
        from ldseg.runtime.backends.onnxruntime.probe import ort_cuda_problem

        return ort_cuda_problem()
    if importlib.util.find_spec("onnxruntime") is None:
        from ldseg.runtime.backends.onnxruntime.probe import missing

        return str(missing("the onnxruntime backend"))
    return None


def precisions(request: Request) -> tuple[str, ...]:
    """What the bundle holds; a checkpoint is exported to FP32 for it."""
    return (bundle_precision(request.source),)


def make(request: Request) -> Made:
    from ldseg.runtime.artifacts.bundle import load_bundle
    from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend

    path = bundle_path(request.source)
    bundle = load_bundle(path, trust_unvalidated=request.source.trust_unvalidated)
    refuse_untrained(path, dict(bundle.trained), SEGMENT_NEEDS)
    artifacts = request.source.artifacts  # a --no-cache run's temporary folder included
    root = artifacts.root if artifacts is not None else None
    backend = OnnxRuntimeBackend(bundle, request.device, threads=request.threads, graph_cache=root)
    return Made(backend, bundle.config, bundle.checkpoint_hash)


DECLARATION = Declaration(
    "onnxruntime", (BUNDLE, CHECKPOINT), ("cpu", "cuda"), probe=probe, precisions=precisions, make=make
)
