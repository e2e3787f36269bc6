"""Device names and, per route, whether a GPU can be used — each route asks its own stack.

A CPU-only PyTorch (the project's own CPU constraint) says nothing about whether ONNX Runtime or
TensorRT can reach the GPU, so nothing here gates one route on another: PyTorch asks torch.cuda,
ONNX Runtime its providers (ldseg/runtime/ort_env.py), TensorRT cuda-python's device count. Each
answers None (usable) or the real reason, e.g. the CUDA error name cudaErrorInsufficientDriver.
"""

from __future__ import annotations

from ldseg.errors import BackendUnavailable


def device_index(device: str) -> int | None:
    """'cpu' -> None, 'cuda' -> 0, 'cuda:N' -> N; anything else is refused."""
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise BackendUnavailable(f"device {device!r}: choose cpu, cuda or cuda:N")


def cuda_device(index: int) -> str:
    return f"cuda:{index}"


def torch_cuda_problem(index: int = 0) -> str | None:
    """Why PyTorch cannot run on GPU `index` (None: it can)."""
    import torch

    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU-only build (the GPU route needs a CUDA build)"
    try:
        torch.cuda.init()  # raises with the driver's own words (no driver, driver too old...)
    except (RuntimeError, AssertionError) as exc:
        return f"PyTorch cannot initialize CUDA: {str(exc).strip().splitlines()[0]}"
    count = torch.cuda.device_count()
    if index >= count:
        return f"GPU {index} requested, PyTorch sees {count} GPU(s) (CUDA_VISIBLE_DEVICES?)"
    return None


def ort_cuda_problem() -> str | None:
    """Why ONNX Runtime cannot offer its CUDA provider here (None: it does)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed: pip install -e '.[gpu]' (onnxruntime-gpu)"
    from ldseg.runtime.ort_env import cuda_problem

    return cuda_problem(list(ort.get_available_providers()))


def cuda_runtime_problem(index: int = 0) -> str | None:
    """Why cuda-python (the TensorRT route) cannot use GPU `index` (None: it can)."""
    from ldseg.runtime import cuda

    try:
        count = cuda.device_count()
    except BackendUnavailable as exc:  # cuda-python missing, or cudaGetDeviceCount failed
        return str(exc)
    if index >= count:
        return f"GPU {index} requested, the CUDA runtime sees {count} GPU(s) (CUDA_VISIBLE_DEVICES?)"
    return None
