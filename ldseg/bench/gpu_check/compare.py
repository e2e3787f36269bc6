"""gpu_check's generic comparisons, which catch what label agreement cannot (a replay from a
plausible wrong start scores 98-99.9 % against the torch reference and passes):
- `graphs_match_eager`: the same inputs through a backend with graphs on and one with graphs off,
  a shape's first request (eager: capture only when it pays), the same again (captures), a replay,
  and others (new noise, a new image, another batch, twice): max |delta p| <= GRAPH_TOLERANCE and
  identical labels on every one;
- `k_samples_within_budget`: `Backend.sample` with K samples, graphs on vs off, the same tolerance,
  and the device memory it added within the budget `decode_chunk` sizes chunks for (half the free
  memory before the run); and the same K samples kept on the device (`sample(resident=True)`, the run
  path's own call where the backend keeps them) equal to the host's bit for bit, maps included (the
  vote entropy within ENTROPY_TOLERANCE: TensorRT's last division is in float32).
Used by the torch checks (torch_checks.py) and the other backends' (backend_checks.py); imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ldseg.bench.gpu_check.report import Result
from ldseg.runtime.samples import host

if TYPE_CHECKING:
    from ldseg.runtime.backend import Backend, PipelineInputs

GRAPH_TOLERANCE = 1e-6  # max |delta p|, graphs on vs off: the same kernels on the same inputs
# Kept vs host vote entropy: torch and ONNX Runtime equal bit for bit (0); TensorRT divides by log(C)
# in float32 (no float64), an ulp or two (< 2.4e-7 on [0, 1]).
ENTROPY_TOLERANCE = 2.4e-7
K_SAMPLES = 4  # within the engines' max batch (4)
MEMORY_FRACTION = 0.5  # of the free device memory before a K-sample run


class HasPhantoms(Protocol):
    def phantoms(self) -> tuple[np.ndarray, np.ndarray, list[int]]: ...


@contextmanager
def closing(*backends: Backend) -> Iterator[None]:
    try:
        yield
    finally:
        for backend in backends:
            backend.close()


def requests_of(cfg: Any, images: np.ndarray, seeds: list[int]) -> list[PipelineInputs]:
    """First request (captured by its repeat), then new noise, a new image, and a batch of two (another shape)."""
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
    """Each request through both; a shape's first request runs eagerly and its second captures, so
    the first request goes three times (eager, capture, replay) and the last shape twice."""
    order = [requests[0], requests[0], requests[0], *requests[1:], requests[-1]]
    diffs, equal, firsts = [], [], []
    for inputs in order:
        g, e = graphed.run(inputs, probabilities=True), eager.run(inputs, probabilities=True)
        assert g.probabilities is not None and e.probabilities is not None
        diffs.append(float(np.abs(g.probabilities - e.probabilities).max()))
        equal.append(float((g.labels == e.labels).mean()))
        firsts.append(g.probabilities)
    differ = float(np.abs(firsts[0] - firsts[3]).max())  # new noise must change the output
    on = graphs_on(graphed)
    ok = on and max(diffs) <= GRAPH_TOLERANCE and min(equal) == 1.0 and differ > 10 * GRAPH_TOLERANCE
    return {
        "status": "pass" if ok else "fail",
        "graphs_on": on,
        "requests": [
            "first (eager)",
            "first again (captures)",
            "first again (replay)",
            "new noise",
            "new image",
            "batch 2 (eager)",
            "batch 2 again (captures)",
        ],
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
    runs = [graphed.sample(inputs) for _ in range(3)]  # eager, capture, replay
    first = runs[0]
    after = free_memory()
    ref = eager.sample(inputs)
    diffs = [float(np.abs(host(r.mean) - host(ref.mean)).max()) for r in runs]
    votes = [bool(np.array_equal(host(r.votes), host(ref.votes))) for r in runs]
    used = None if before is None or after is None else before - after
    within = used is None or used <= MEMORY_FRACTION * before  # type: ignore[operator]
    kept, last = graphed.sample(inputs, resident=True), runs[-1]
    classes = graphed.config.num_classes
    entropy_off = float(np.abs(host(kept.entropy(classes)) - host(last.entropy(classes))).max())
    resident: dict[str, Any] = {
        "kept": type(kept.mean).__name__,
        "mean": bool(np.array_equal(host(kept.mean), host(last.mean))),
        "votes": bool(np.array_equal(host(kept.votes), host(last.votes))),
        "confidence": bool(np.array_equal(host(kept.confidence()), host(last.confidence()))),
        "entropy_max_abs": entropy_off,
    }
    ok = (
        max(diffs) <= GRAPH_TOLERANCE
        and all(votes)
        and within
        and all(resident[key] for key in ("mean", "votes", "confidence"))
        and entropy_off <= ENTROPY_TOLERANCE
    )
    return {
        "status": "pass" if ok else "fail",
        "samples": inputs.batch,
        "chunk": first.chunk,
        "max_abs_delta_mean_p": diffs,
        "votes_equal": votes,
        "resident_equal_to_host": resident,
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


def k_inputs(checks: HasPhantoms, cfg: Any) -> PipelineInputs:
    from ldseg.runtime.backend import make_inputs

    images, _, seeds = checks.phantoms()
    return make_inputs(cfg, images[:1], [seeds[0] + 100 * k for k in range(K_SAMPLES)])
