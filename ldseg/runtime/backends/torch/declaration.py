"""The torch backend: runs a checkpoint itself (no export), on the CPU or a CUDA GPU, in FP32."""

from __future__ import annotations

from ldseg.runtime.artifacts.source import torch_missing
from ldseg.runtime.backends.declaration import CHECKPOINT, Declaration, Made, Request
from ldseg.runtime.devices import device_index


def probe(request: Request) -> str | None:
    """PyTorch is installed and, for cuda:N, sees GPU N (without importing torch when it is absent)."""
    missing = torch_missing("the torch backend")
    if missing is not None:
        return str(missing)
    index = device_index(request.device)
    if index is None:
        return None
    from ldseg.runtime.backends.torch.backend import torch_cuda_problem

    return torch_cuda_problem(index)


def precisions(request: Request) -> tuple[str, ...]:
    return ("fp32",)


def make(request: Request) -> Made:
    from ldseg.runtime.backends.torch.backend import TorchBackend

    model = request.source.model()
    backend = TorchBackend(model, request.device, threads=request.threads)
    return Made(backend, model.cfg, model.checkpoint_hash)


DECLARATION = Declaration(
    "torch", (CHECKPOINT,), ("cpu", "cuda"), probe=probe, precisions=precisions, make=make, exports=False
)
