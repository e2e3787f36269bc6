"""ldseg's Prometheus metrics, exported by Ray beside Serve's own (ray_serve_*) on Ray's metrics
port (`ldseg-serve --metrics-port`): request latency per endpoint and status, time per stage, and
the size of the Serve batches requests ran in. Ray prefixes them: `ray_ldseg_request_seconds`.
"""

from __future__ import annotations

from ray.serve import metrics

_SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
_MS = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0]


class ServeMetrics:
    """Made once per replica (Ray metrics are per process, aggregated by Ray's exporter)."""

    def __init__(self) -> None:
        self.latency = metrics.Histogram(
            "ldseg_request_seconds",
            description="Request latency, body received to response ready.",
            boundaries=_SECONDS,
            tag_keys=("endpoint", "status"),  # type: ignore[arg-type]  # Ray annotates tuple[str]
        )
        self.stages = metrics.Histogram(
            "ldseg_stage_ms", description="Time per stage of a request (ms).", boundaries=_MS, tag_keys=("stage",)
        )
        self.batch = metrics.Histogram(
            "ldseg_batch_size", description="Requests per Serve batch.", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.latency.observe(seconds, tags={"endpoint": endpoint, "status": str(status)})

    def stage_times(self, stage_ms: dict[str, float]) -> None:
        for stage, ms in stage_ms.items():
            self.stages.observe(float(ms), tags={"stage": stage})

    def batch_size(self, size: int) -> None:
        self.batch.observe(float(size))
