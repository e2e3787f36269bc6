"""Device names (runtime/devices.py) and each backend's own GPU probe, with the GPU stack faked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldseg.errors import BackendUnavailable
from ldseg.runtime import devices
from ldseg.runtime.backends.tensorrt import cuda
from ldseg.runtime.backends.torch import backend as torch_backend


def test_device_names():
    assert devices.device_index("cpu") is None
    assert devices.device_index("cuda") == 0 and devices.device_index("cuda:3") == 3
    with pytest.raises(BackendUnavailable, match="choose cpu, cuda or cuda:N"):
        devices.device_index("gpu")


def test_cpu_only_torch_is_named_as_such(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in torch_backend.torch_cuda_problem(0)


# A fresh process where the installed torch's version reads as argv[1] and libcuda.so.1 loads
# (argv[2] "driver") or does not ("no-driver"): torch/cuda's problem, and whether asking it imported
# torch (1.1 s of a cold CPU run, where auto asks torch/cuda before OpenVINO).
_ASK_TORCH_CUDA = """
import ctypes, importlib.metadata, json, sys
real_version, real_cdll = importlib.metadata.version, ctypes.CDLL
importlib.metadata.version = lambda name: sys.argv[1] if name == "torch" else real_version(name)

def cdll(name, *args, **kwargs):
    if name != "libcuda.so.1":
        return real_cdll(name, *args, **kwargs)
    if sys.argv[2] == "no-driver":
        raise OSError("libcuda.so.1: cannot open shared object file")
    return object()  # the driver "loads" (whatever this machine has)

ctypes.CDLL = cdll
from ldseg.runtime.select import torch_cuda_problem
print(json.dumps([torch_cuda_problem(0), "torch" in sys.modules]))
"""


def _ask_torch_cuda(version: str, driver: str) -> tuple[str | None, bool]:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", _ASK_TORCH_CUDA, version, driver],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    problem, imported = json.loads(done.stdout.splitlines()[-1])
    return problem, imported


def test_no_gpu_is_known_without_importing_torch_where_its_build_or_the_driver_says_so():
    problem, imported = _ask_torch_cuda("2.13.0+cpu", "driver")
    assert problem == "this PyTorch (2.13.0+cpu) is a CPU-only build (the GPU route needs a CUDA build)"
    assert not imported
    if sys.platform == "linux":
        problem, imported = _ask_torch_cuda("2.13.0", "no-driver")
        assert problem == "PyTorch (2.13.0) cannot use CUDA here: no NVIDIA driver (libcuda.so.1 does not load)"
        assert not imported
    # Where the build may have CUDA and the driver may be there, or the build is ROCm's: torch is asked.
    for version, driver in (("2.13.0", "driver"), ("2.13.0+rocm6.2", "no-driver")):
        _, imported = _ask_torch_cuda(version, driver)
        assert imported, (version, driver)


def test_torch_driver_error_is_reported_verbatim(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nmore")

    monkeypatch.setattr(torch.cuda, "init", init)
    problem = torch_backend.torch_cuda_problem(0)
    expected = "PyTorch cannot initialize CUDA: The NVIDIA driver on your system is too old (found version 11040)."
    assert problem == expected


def test_torch_counts_gpus(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert torch_backend.torch_cuda_problem(0) is None
    assert "GPU 1 requested, PyTorch sees 1" in torch_backend.torch_cuda_problem(1)


class _FakeCudart:
    """cuda-python's calling convention: (error, *values); error names via cudaGetErrorName."""

    class cudaError_t:  # noqa: N801 - the binding's name
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35

    def __init__(self, error: int, count: int = 0):
        self.error, self.count = error, count

    def cudaGetDeviceCount(self):  # noqa: N802
        return (self.error, self.count)

    def cudaGetErrorName(self, err):  # noqa: N802
        return (0, b"cudaErrorInsufficientDriver" if err == 35 else b"cudaSuccess")


@pytest.fixture
def fake_cudart(monkeypatch):
    def install(error: int, count: int = 0) -> None:
        monkeypatch.setattr(cuda, "runtime", lambda: _FakeCudart(error, count))

    return install


def test_cuda_runtime_error_name_not_no_gpu(fake_cudart):
    fake_cudart(35)
    problem = cuda.cuda_runtime_problem(0)
    assert problem == "CUDA call cudaGetDeviceCount failed: cudaErrorInsufficientDriver"
    with pytest.raises(BackendUnavailable, match="cudaErrorInsufficientDriver"):
        cuda.gpu_info(0)


def test_cuda_runtime_sees_gpus(fake_cudart):
    fake_cudart(0, 2)
    assert cuda.cuda_runtime_problem(1) is None
    assert "GPU 2 requested, the CUDA runtime sees 2" in cuda.cuda_runtime_problem(2)


def test_cuda_python_missing_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    cuda.runtime.cache_clear()
    try:
        assert "cuda-python is not installed" in cuda.cuda_runtime_problem(0)
    finally:
        cuda.runtime.cache_clear()
