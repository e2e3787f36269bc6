"""Which onnxruntime is installed, and what to do when it cannot do what was asked.

`onnxruntime` (CPU) and `onnxruntime-gpu` are two distributions of one `onnxruntime` module: with
both installed, whichever was installed last owns the files, and the CUDA provider may be gone. So
ldseg installs exactly one (pyproject extras `cpu` / `gpu`) and checks at backend start that the
one it finds can do the job, saying exactly how to fix the install when it cannot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ldseg.errors import BackendUnavailable
from ldseg.versions import installed_versions

CPU_DIST, GPU_DIST = "onnxruntime", "onnxruntime-gpu"
# Every distribution that installs the `onnxruntime` module (any two of them clash).
DISTRIBUTIONS = (CPU_DIST, GPU_DIST, "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn")
CUDA_PROVIDER = "CUDAExecutionProvider"
# The CUDA EP captures a graph id on its third run: two regular runs first allocate what the
# capture may not (onnxruntime cuda_execution_provider.h, min_num_runs_before_cuda_graph_capture_ = 2).
RUNS_TO_CAPTURE = 3


def installed() -> dict[str, str]:
    """{distribution: version} of every installed onnxruntime distribution."""
    return installed_versions(DISTRIBUTIONS)


def missing(purpose: str) -> BackendUnavailable:
    """The error for `import onnxruntime` failing: which extra to install."""
    return BackendUnavailable(
        f"onnxruntime is not installed ({purpose} needs it): pip install -e '.[cpu]' on a CPU machine, "
        "or pip install -e '.[gpu]' (onnxruntime-gpu) on a CUDA machine"
    )


@contextlib.contextmanager
def onnxruntime_needed(purpose: str) -> Iterator[None]:
    """The one guard around `import onnxruntime` (at module level or in a function): not installed,
    BackendUnavailable saying which extra to install for `purpose`."""
    try:
        yield
    except ImportError as exc:
        raise missing(purpose) from exc


def cuda_problem(available_providers: list[str], dists: dict[str, str] | None = None) -> str | None:
    """Why ONNX Runtime cannot run on CUDA here (None: the CUDA provider is offered), with the fix."""
    dists = installed() if dists is None else dists
    listed = ", ".join(f"{name} {version}" for name, version in sorted(dists.items())) or "none found"
    if len(dists) > 1:
        return (
            f"several onnxruntime distributions are installed ({listed}); they share one `onnxruntime` module "
            f"and the CUDA provider is lost: pip uninstall -y {' '.join(sorted(dists))} && "
            f"pip install {GPU_DIST} (or reinstall with pip install -e '.[gpu]', without '.[cpu]')"
        )
    if CUDA_PROVIDER in available_providers:
        return None
    if GPU_DIST not in dists:
        return (
            f"this onnxruntime ({listed}) has no CUDA provider (it offers {', '.join(available_providers)}): "
            f"pip uninstall -y {' '.join(sorted(dists)) or CPU_DIST} && pip install -e '.[gpu]' (onnxruntime-gpu)"
        )
    return (
        f"{GPU_DIST} {dists[GPU_DIST]} is installed but offers only {', '.join(available_providers)}: "
        "the CUDA and cuDNN libraries it was built for were not found (see ONNX Runtime's CUDA provider "
        f"requirements; pip install '{GPU_DIST}[cuda,cudnn]' brings them)"
    )


def ort_cuda_problem() -> str | None:
    """Why ONNX Runtime cannot offer its CUDA provider here (None: it does)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed: pip install -e '.[gpu]' (onnxruntime-gpu)"
    return cuda_problem(list(ort.get_available_providers()))
