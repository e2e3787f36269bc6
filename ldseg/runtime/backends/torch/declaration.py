"""The torch backend: runs a checkpoint itself (no export), on the CPU or a CUDA GPU.

FP32 always (what `auto` runs: never a silent reduction); bf16 on the CPU and a GPU, fp16 on a GPU
only (PyTorch's CPU autocast has no FP16 convolutions worth running), each asked for by name and
held to the accuracy gate (gate.py) before it runs.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import sys

from ldseg.runtime.artifacts.source import torch_missing
from ldseg.runtime.backends.declaration import CHECKPOINT, Declaration, Made, Request
from ldseg.runtime.devices import device_index


def known_without_torch() -> str | None:
    """Why PyTorch cannot reach a GPU, where that is known without importing it; None otherwise
    (then torch itself is asked).

    `auto` asks torch on CUDA before OpenVINO on the CPU, and importing torch only to hear "no GPU"
    cost 1.1 s of every cold CPU run on a 2-core EPYC. Known without it: a CPU-only build (its
    package version ends in +cpu), and on Linux a CUDA build without the NVIDIA driver's
    libcuda.so.1, which CUDA loads by that name (a ROCm build is asked). Once torch is imported
    (the caller's own, possibly patched, torch), its answer is the one that counts."""
    if "torch" in sys.modules:
        return None
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    if version.endswith("+cpu"):
        return f"this PyTorch ({version}) is a CPU-only build (the GPU route needs a CUDA build)"
    if sys.platform == "linux" and "rocm" not in version and not _nvidia_driver_loads():
        return f"PyTorch ({version}) cannot use CUDA here: no NVIDIA driver (libcuda.so.1 does not load)"
    return None


def _nvidia_driver_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cuda_problem(index: int) -> str | None:
    """Why PyTorch cannot run on GPU `index` (not installed included), None if it can."""
    missing = torch_missing("the torch backend")
    if missing is not None:
        return str(missing)
    problem = known_without_torch()
    if problem is not None:
        return problem
    from ldseg.runtime.backends.torch.backend import torch_cuda_problem

    return torch_cuda_problem(index)


def probe(request: Request) -> str | None:
    """PyTorch is installed and, for cuda:N, sees GPU N (without importing torch where the answer
    is known without it)."""
    index = device_index(request.device)
    if index is not None:
        return cuda_problem(index)
    missing = torch_missing("the torch backend")
    return None if missing is None else str(missing)


def precisions_on(on_gpu: bool) -> tuple[str, ...]:
    """What the torch backend computes in on a GPU or the CPU (the bench asks this too)."""
    return ("fp32", "bf16", "fp16") if on_gpu else ("fp32", "bf16")


def precisions(request: Request) -> tuple[str, ...]:
    return precisions_on(request.on_gpu)


def make(request: Request) -> Made:
    from ldseg.runtime.backends.torch.backend import TorchBackend

    precision = "fp32" if request.precision == "auto" else request.precision
    if precision == "fp32":
        model = request.source.model()
        backend = TorchBackend(model, request.device, threads=request.threads, lean=True)
        return Made(backend, model.cfg, model.checkpoint_hash)
    from ldseg.errors import BackendUnavailable
    from ldseg.runtime.backends.torch import gate

    # The checkpoint's verified content hash from its header: a cached refusal loads no model.
    verdict = gate.cached_verdict(request.source.reference().sha256, precision, request.device)
    if verdict is not None and not verdict.passed:  # refused by an earlier process: nothing is made
        raise BackendUnavailable(verdict.refusal())
    model = request.source.model()
    backend = TorchBackend(model, request.device, threads=request.threads, precision=precision, lean=True)
    try:
        verdict = gate.hold(backend, model.checkpoint_hash, verdict)
    except BackendUnavailable:
        backend.close()
        raise
    return Made(backend, model.cfg, model.checkpoint_hash, verdict.words())


DECLARATION = Declaration(
    "torch", (CHECKPOINT,), ("cpu", "cuda"), probe=probe, precisions=precisions, make=make, exports=False
)
