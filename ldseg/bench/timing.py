"""Clocks: perf_counter on CPU, CUDA events on GPU. Both return milliseconds for one call of `fn`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Protocol

import torch


class Timer(Protocol):
    name: str

    def __call__(self, fn: Callable[[], object]) -> float: ...


class WallTimer:
    name = "perf_counter"

    def __call__(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class CudaEventTimer:
    """Events on the current stream around `fn`, after a device sync so earlier work is excluded.

    Untested here (no GPU on the machines that wrote it). A stage that ends with a host copy
    (output copy, ONNX Runtime session runs) blocks the host, so the end event still follows it.
    """

    name = "cuda_event"

    def __call__(self, fn: Callable[[], object]) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))


def timer_for(device: str) -> Timer:
    return CudaEventTimer() if device.startswith("cuda") else WallTimer()


def median_ms(fn: Callable[[], object], timer: Timer, runs: int, warmup: int = 1) -> float:
    """The median of `runs` timed calls of `fn` after `warmup` untimed ones (graph capture, caches)."""
    for _ in range(warmup):
        fn()
    return float(statistics.median(timer(fn) for _ in range(runs)))
