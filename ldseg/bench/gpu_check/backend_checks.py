"""gpu_check's checks of the GPU backends beyond torch: ONNX Runtime CUDA, TensorRT, the bench.

Two generic checks catch what label agreement cannot (a replay from a plausible wrong start scores
98-99.9 % against the torch reference and passes):
- `graphs_match_eager`: the same inputs through a backend with graphs on and one with graphs off,
  the first (capturing) request, the same request again, and others (new noise, a new image, another
  batch): max |delta p| <= GRAPH_TOLERANCE and identical labels on every one;
- `k_samples_within_budget`: `Backend.sample` with K samples, graphs on vs off, the same tolerance,
  and the device memory it added within the budget `decode_chunk` sizes chunks for (half the free
  memory before the run).
Every backend a check makes is closed in `finally`. Both are tested on CPU through the emulated
GPU of tests/tensorrt/emulator.py (tests/bench/test_gpu_check_backends.py).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from ldseg.bench.gpu_check.prepare import BUNDLES
from ldseg.bench.gpu_check.report import Result

if TYPE_CHECKING:
    from ldseg.bench.gpu_check.torch_checks import Checks
    from ldseg.runtime.backend import Backend, PipelineInputs

GRAPH_TOLERANCE = 1e-6  # max |delta p|, graphs on vs off: the same kernels on the same inputs
K_SAMPLES = 4  # within the engines' max batch (4)
MEMORY_FRACTION = 0.5  # of the free device memory before a K-sample run
# An engine set of the demo model (4 graphs) builds in well under this on a datacenter GPU; with less
# time left the build is skipped, with the reason, rather than cut off by the watchdog mid-way.
ENGINE_BUILD_S = 150.0
BENCH_TIMEOUT_S = 240.0


@contextmanager
def closing(*backends: Backend) -> Iterator[None]:
    try:
        yield
    finally:
        for backend in backends:
            backend.close()


def requests_of(cfg: Any, images: np.ndarray, seeds: list[int]) -> list[PipelineInputs]:
    """First request (captured), then new noise, a new image, and a batch of two (another shape)."""
    from ldseg.runtime.backend import make_inputs

    return [
        make_inputs(cfg, images[:1], [seeds[0]]),
        make_inputs(cfg, images[:1], [seeds[1]]),
        make_inputs(cfg, images[1:2], [seeds[0]]),
        make_inputs(cfg, images[:2], seeds[:2]),
    ]


def graphs_match_eager(
    graphed: Backend, eager: Backend, requests: list[PipelineInputs], graphs_on: Callable[[Backend], bool]
) -> Result:
    """Each request through both; the first one twice (its first run captures, the second replays)."""
    order = [requests[0], requests[0], *requests[1:]]
    diffs, equal, firsts = [], [], []
    for inputs in order:
        g, e = graphed.run(inputs, probabilities=True), eager.run(inputs, probabilities=True)
        assert g.probabilities is not None and e.probabilities is not None
        diffs.append(float(np.abs(g.probabilities - e.probabilities).max()))
        equal.append(float((g.labels == e.labels).mean()))
        firsts.append(g.probabilities)
    differ = float(np.abs(firsts[0] - firsts[2]).max())  # new noise must change the output
    on = graphs_on(graphed)
    ok = on and max(diffs) <= GRAPH_TOLERANCE and min(equal) == 1.0 and differ > 10 * GRAPH_TOLERANCE
    return {
        "status": "pass" if ok else "fail",
        "graphs_on": on,
        "requests": ["first (captures)", "first again (replay)", "new noise", "new image", "batch 2"],
        "max_abs_delta_p": diffs,
        "labels_equal": equal,
        "tolerance": GRAPH_TOLERANCE,
        "new_noise_changes_output_by": differ,
        "describe": graphed.describe(),
    }


def k_samples_within_budget(
    graphed: Backend, eager: Backend, inputs: PipelineInputs, free_memory: Callable[[], int | None]
) -> Result:
    """sample() with graphs on and off: same mean and votes, device memory added within budget."""
    before = free_memory()
    first = graphed.sample(inputs)
    again = graphed.sample(inputs)
    after = free_memory()
    ref = eager.sample(inputs)
    diffs = [float(np.abs(r.mean - ref.mean).max()) for r in (first, again)]
    votes = [bool(np.array_equal(r.votes, ref.votes)) for r in (first, again)]
    used = None if before is None or after is None else before - after
    within = used is None or used <= MEMORY_FRACTION * before  # type: ignore[operator]
    ok = max(diffs) <= GRAPH_TOLERANCE and all(votes) and within
    return {
        "status": "pass" if ok else "fail",
        "samples": inputs.batch,
        "chunk": first.chunk,
        "max_abs_delta_mean_p": diffs,
        "votes_equal": votes,
        "device_bytes_added": used,
        "device_budget_bytes": None if before is None else int(MEMORY_FRACTION * before),
        "memory": "measured" if used is not None else "not measured (no cudaMemGetInfo here)",
    }


def free_device_memory() -> int | None:
    """Free bytes on GPU 0 (cuda-python), None where that cannot be read."""
    from ldseg.errors import BackendUnavailable
    from ldseg.runtime.backends.tensorrt import cuda

    try:
        return cuda.memory_info()[0]
    except BackendUnavailable:
        return None


def k_inputs(checks: Checks, cfg: Any) -> PipelineInputs:
    from ldseg.runtime.backend import make_inputs

    images, _, seeds = checks.phantoms()
    return make_inputs(cfg, images[:1], [seeds[0] + 100 * k for k in range(K_SAMPLES)])


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
