"""gpu_check's checks of the GPU backends beyond torch: ONNX Runtime CUDA, TensorRT, the bench,
through the generic comparisons of compare.py (graphs on vs off, K samples within budget). Every
backend a check makes is closed in `finally`. Tested on CPU through the emulated GPU of
tests/tensorrt/emulator.py (tests/bench/test_gpu_check_backends.py).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from typing import TYPE_CHECKING

from ldseg.bench.gpu_check.compare import (  # noqa: F401  (K_SAMPLES: what the tests ask for)
    K_SAMPLES,
    closing,
    free_device_memory,
    graphs_match_eager,
    k_inputs,
    k_samples_within_budget,
    requests_of,
)
from ldseg.bench.gpu_check.prepare import BUNDLES
from ldseg.bench.gpu_check.report import Result

if TYPE_CHECKING:
    from ldseg.bench.gpu_check.torch_checks import Checks

# An engine set of the demo model (4 graphs) builds in well under this on a datacenter GPU; with less
# time left the build is skipped, with the reason, rather than cut off by the watchdog mid-way.
ENGINE_BUILD_S = 150.0
BENCH_TIMEOUT_S = 240.0


# --------------------------------------------------------------------------- ONNX Runtime CUDA


def onnxruntime_cuda(checks: Checks, kind: str = "agreement") -> Result:
    """kind: agreement (labels vs the torch CPU reference), graphs (on vs off), k_samples."""
    from ldseg.errors import BackendUnavailable
    from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend

    bundle = checks.prepared / BUNDLES["fp32"]
    try:
        graphed = OnnxRuntimeBackend(bundle, "cuda:0")
    except BackendUnavailable as exc:
        checks.available["onnxruntime"] = False
        return {"status": f"not run: {exc}"}
    checks.available["onnxruntime"] = True
    if kind == "agreement":
        with closing(graphed):
            result = checks.scored(checks.labels_of(graphed))
            result["describe"] = graphed.describe()
            return result
    eager = OnnxRuntimeBackend(bundle, "cuda:0", cuda_graph=False)
    with closing(graphed, eager):
        if kind == "graphs":
            images, _, seeds = checks.phantoms()
            return graphs_match_eager(
                graphed, eager, requests_of(graphed.config, images, seeds), lambda _: not graphed.graph_refusals
            )
        return k_samples_within_budget(graphed, eager, k_inputs(checks, graphed.config), free_device_memory)


# --------------------------------------------------------------------------- TensorRT


def tensorrt(checks: Checks, precision: str) -> Result:
    """Build the engines (if the budget allows), then labels vs the torch CPU reference."""
    from ldseg.errors import BackendUnavailable
    from ldseg.export.tensorrt_build import build_engines
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend
    from ldseg.runtime.backends.tensorrt.probe import require_tensorrt

    try:
        require_tensorrt()
    except BackendUnavailable as exc:
        checks.available["tensorrt"] = False
        return {"status": f"not run: {exc}"}
    checks.available["tensorrt"] = True
    left = checks.remaining()
    if left < ENGINE_BUILD_S:
        return {"status": f"not run: {left:.0f} s of the budget left, an engine build needs ~{ENGINE_BUILD_S:.0f} s"}
    engines = build_engines(
        checks.prepared / BUNDLES[precision],
        checks.out_dir / "engines" / precision,
        precision=precision,
        max_batch=K_SAMPLES,
        overwrite=True,
    )
    checks.engines[precision] = engines
    backend = TensorRTBackend(engines, "cuda:0")
    with closing(backend):
        result = checks.scored(checks.labels_of(backend), precision)
        result["describe"] = backend.describe()
        return result


def tensorrt_graphs(checks: Checks, precision: str, kind: str) -> Result:
    """kind: graphs (on vs off) or k_samples, on the engines tensorrt() built."""
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend

    engines = checks.engines.get(precision)
    if engines is None:
        return {"status": f"not run: tensorrt_{precision} built no engines"}
    graphed = TensorRTBackend(engines, "cuda:0", cuda_graph=True)
    eager = TensorRTBackend(engines, "cuda:0", cuda_graph=False)
    with closing(graphed, eager):
        if kind == "graphs":
            images, _, seeds = checks.phantoms()
            return graphs_match_eager(
                graphed, eager, requests_of(graphed.config, images, seeds), lambda b: b.mode == "cuda-graph"
            )
        return k_samples_within_budget(graphed, eager, k_inputs(checks, graphed.config), free_device_memory)


def tensorrt_volume_ops(checks: Checks) -> Result:
    """The volume engines of the set tensorrt("fp32") built, against the CPU path (volume_checks)."""
    from ldseg.bench.gpu_check.volume_checks import device_volume_ops
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend

    engines = checks.engines.get("fp32")
    if engines is None:
        return {"status": "not run: tensorrt_fp32 built no engines"}
    backend = TensorRTBackend(engines, "cuda:0")
    with closing(backend):
        return device_volume_ops(backend.volume_ops, "the engine set has no volume engines")


# --------------------------------------------------------------------------- bench


def bench(checks: Checks) -> Result:
    lacking = [
        m
        for m in ("matplotlib", "scipy", "typer", "rich", "psutil", "nibabel", "safetensors")
        if importlib.util.find_spec(m) is None
    ]
    if lacking:
        return {"status": f"not run: ldseg-bench needs {', '.join(lacking)}, not installed on this machine"}
    timeout = min(BENCH_TIMEOUT_S, checks.remaining() - 5)
    if timeout < 30:
        return {"status": f"not run: {checks.remaining():.0f} s of the budget left"}
    backends = ["torch"] + [b for b in ("onnxruntime", "tensorrt") if checks.available.get(b)]
    out = checks.out_dir / "bench"
    command = [sys.executable, "-m", "ldseg.bench", "--device", "cuda", "--checkpoint", "demo"]
    if backends != ["torch"]:
        command += ["--bundle", str(checks.prepared / BUNDLES["fp32"])]
    command += ["--backends", ",".join(backends), "--steps", "15", "--batch", "1,4", "--repeat", "10"]
    command += ["--warmup", "0", "-o", str(out), "--overwrite"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "fail", "command": " ".join(command[1:]), "error": f"timed out after {timeout:.0f} s"}
    result: Result = {
        "status": "pass" if done.returncode == 0 else "fail",
        "command": " ".join(command[1:]),
        "returncode": done.returncode,
        "output_tail": (done.stdout + done.stderr)[-3000:],
    }
    if done.returncode == 0:
        rows = json.loads((out / "results.json").read_text())["rows"]
        result["rows"] = [
            {
                "label": r["label"],
                "steps": r["steps"],
                "batch": r["batch"],
                "p50_ms": r["end_to_end"]["ms"]["p50"],
                "speedup": r["speedup_vs_reference"],
                "agreement": r["accuracy"]["agreement"],
            }
            for r in rows
        ]
    return result
