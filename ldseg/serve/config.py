"""What ldseg-serve is started with (the CLI builds it; tests and benchmarks build it directly)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ldseg.runs.specs import ModelSpec

DEFAULT_MAX_UPLOAD_MB = 2048
SAMPLES_CEILING = 64  # the most K samples any service takes (--max-samples)
# The K a service takes by default from a checkpoint or a bundle (issue 30 measures --samples 8);
# an engine set takes what it was built for.
DEFAULT_MAX_SAMPLES = 8


def default_max_samples(model: ModelSpec) -> int:
    """The largest K a service of `model` takes unless told: an engine set's largest batch (what its
    TensorRT profiles hold), else DEFAULT_MAX_SAMPLES (engines built from a checkpoint are built for it)."""
    if model.engines is not None:
        from ldseg.runtime.artifacts.engines import read_engine_set

        return min(read_engine_set(model.engines).max_batch, SAMPLES_CEILING)
    return DEFAULT_MAX_SAMPLES


@dataclass(frozen=True)
class ServeConfig:
    """`model`: what each replica builds its backend from. `max_samples`: the largest K a request may
    ask for (None: default_max_samples); it becomes the model's capacity, so engines are built for
    it, a backend that cannot take it is refused at start, and a request above it gets 400.

    Back-pressure: a replica runs up to `max_batch` requests as one Serve batch (gathered for at
    most `batch_wait_s`) and admits `max_queued` more; the next gets 503 with Retry-After.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    max_samples: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_batch: int = 4
    batch_wait_s: float = 0.01
    max_queued: int = 32
    api_key: str | None = None
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    dicomweb: str | None = None  # DICOMweb root URL (e.g. http://127.0.0.1:8042/dicom-web)
    dicomweb_timeout_s: float = 120.0
    metrics_port: int | None = None  # Ray's Prometheus exporter (Serve's metrics and ldseg's)
    ready_timeout_s: float = 900.0  # a first export into the artifact cache can take minutes

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_batch < 1 or self.max_queued < 0 or self.max_upload_mb < 1:
            raise ValueError("--replicas, --max-batch and --max-upload-mb must be at least 1, --max-queued at least 0")
        if self.gpus_per_replica < 0:
            raise ValueError("--gpus-per-replica must be at least 0")
        k = default_max_samples(self.model) if self.max_samples is None else self.max_samples
        if not 1 <= k <= SAMPLES_CEILING:
            raise ValueError(f"--max-samples {k}: must be in 1..{SAMPLES_CEILING}")
        object.__setattr__(self, "max_samples", k)
        object.__setattr__(self, "model", dataclasses.replace(self.model, max_samples=k))

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


def read_api_key(path: Path) -> str:
    """The key in `path` (first line, stripped); ValueError for an empty or unreadable file."""
    try:
        key = path.read_text(encoding="utf-8").strip().splitlines()[0].strip() if path.stat().st_size else ""
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise ValueError(f"--api-key-file {path}: cannot read it ({exc})") from exc
    if len(key) < 16:
        raise ValueError(f"--api-key-file {path}: the key must be at least 16 characters")
    return key
