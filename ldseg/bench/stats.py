"""Latency summaries: percentiles by linear interpolation (numpy's default method)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) of `values`: rank q/100 * (n - 1) in sorted order, interpolated."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True)
class Summary:
    """Milliseconds over `n` timed repeats."""

    p50: float
    p95: float
    p99: float
    min: float
    mean: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(samples_ms: Sequence[float]) -> Summary:
    return Summary(
        p50=percentile(samples_ms, 50),
        p95=percentile(samples_ms, 95),
        p99=percentile(samples_ms, 99),
        min=min(samples_ms),
        mean=sum(samples_ms) / len(samples_ms),
        n=len(samples_ms),
    )
