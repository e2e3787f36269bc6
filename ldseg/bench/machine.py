"""What ran the benchmark: machine, library versions, git commit, and memory high-water marks."""

from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import torch

from ldseg.versions import installed_versions

LIBRARIES = ("ldseg", "torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "openvino")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
    }


def machine_slug(info: dict[str, Any]) -> str:
    """Short folder-friendly name: the GPU if there is one, else CPU model and core count."""
    name = info["gpu"] or f"{info['cpu']} {info['cores_logical']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "machine"


def library_versions() -> dict[str, str]:
    return {"python": sys.version.split()[0], **installed_versions(LIBRARIES)}


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """HEAD and whether tracked files differ from it; read-only (no index refresh). Committed
    benchmark results do not count: a sweep rewriting them must not mark its own later runs dirty."""
    cwd = repo or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = (
        git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
        if commit
        else None
    )
    return {"commit": commit or "unknown", "dirty": None if status is None else bool(status)}


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Process peak RSS: VmHWM (resettable) where /proc has it, else getrusage's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
