"""Percentiles and summaries against hand-computed values (linear interpolation between ranks)."""

from __future__ import annotations

import numpy as np
import pytest

from ldseg.bench.stats import percentile, summarize


def test_percentiles_of_one_to_hundred():
    values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    s = summarize(values)
    assert s.p50 == pytest.approx(50.5)
    assert s.p95 == pytest.approx(95.05)  # rank 0.95 * 99 = 94.05 -> 95 + 0.05 * (96 - 95)
    assert s.p99 == pytest.approx(99.01)
    assert (s.min, s.mean, s.n) == (1.0, 50.5, 100)


def test_percentiles_of_four_values():
    values = [40.0, 10.0, 30.0, 20.0]
    assert percentile(values, 0) == 10.0
    assert percentile(values, 50) == pytest.approx(25.0)
    assert percentile(values, 95) == pytest.approx(38.5)  # rank 2.85
    assert percentile(values, 99) == pytest.approx(39.7)  # rank 2.97
    assert percentile(values, 100) == 40.0


def test_matches_numpy_default_method():
    values = list(np.random.default_rng(0).gamma(2.0, 3.0, size=37))
    for q in (0, 1, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_single_value_and_bad_input():
    assert summarize([3.0]).to_dict() == {"p50": 3.0, "p95": 3.0, "p99": 3.0, "min": 3.0, "mean": 3.0, "n": 1}
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
