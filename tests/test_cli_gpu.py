"""GPU-readiness of the console scripts, checked on a CPU machine: what they say where a GPU route
cannot run (the real CPU-only stack here, and onnxruntime hidden from a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    tool, *rest = args
    return subprocess.run([str(BIN / tool), *rest], capture_output=True, text=True, timeout=600)


def test_gpu_index_contradicting_cpu_is_a_usage_error(tmp_path):
    result = cli("ldseg-run", "--demo", "-o", str(tmp_path), "--device", "cpu", "--gpu", "1")
    assert result.returncode == 2 and "contradicts --device cpu" in result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="this PyTorch has CUDA")
def test_torch_on_cuda_names_the_cpu_only_build(tmp_path):
    result = cli("ldseg-run", "--demo", "-o", str(tmp_path), "--backend", "torch", "--device", "cuda", "--gpu", "1")
    assert result.returncode == 6, result.stderr
    assert "CPU-only build" in result.stderr and "Traceback" not in result.stderr


def test_without_onnxruntime_each_user_names_the_extra():
    """`import onnxruntime` failing (neither extra installed) is one sentence naming the extras."""
    code = (
        "import sys, importlib\n"
        "sys.modules['onnxruntime'] = None\n"
        "from ldseg.errors import BackendUnavailable\n"
        "modules = ('ldseg.runtime.backends.onnxruntime.backend', 'ldseg.export.validate',\n"
        "           'ldseg.calibration.quantize')\n"
        "for name in modules:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BackendUnavailable as exc:\n"
        "        print(name, '|', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout + result.stderr
    for line in lines:
        assert "onnxruntime is not installed" in line and "'.[cpu]'" in line and "'.[gpu]'" in line
