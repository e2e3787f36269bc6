"""Device names and, per route, whether a GPU can be used — each route asks its own stack.

A CPU-only PyTorch (the project's own CPU constraint) says nothing about whether ONNX Runtime or
TensorRT can reach the GPU, so nothing here gates one route on another: PyTorch asks torch.cuda,
ONNX Runtime its providers (ldseg/runtime/backends/onnxruntime/probe.py), TensorRT cuda-python's device count. Each
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


def nvidia_gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU at all, asked of the driver's files (no CUDA library
    loaded): decides whether an unusable GPU route is worth a line on the first screen."""
    from pathlib import Path

    gpus = Path("/proc/driver/nvidia/gpus")
    return (
        (gpus.is_dir() and any(gpus.iterdir()))
        or Path("/dev/nvidia0").exists()
        or Path("/etc/nv_tegra_release").exists()
    )
