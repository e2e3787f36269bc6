"""The device's measured matmul peak: the roofline every achieved GFLOP/s is compared with."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ldseg.bench.timing import timer_for
from ldseg.runtime.torch_backend import strict_fp32

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Peak:
    device: str
    dtype: str
    size: int  # square matmuls of size x size
    repeat: int
    gflops: float  # best of `repeat` (the attainable peak)
    median_gflops: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_peak(device: str, dtype: str = "fp32", size: int = 2048, repeat: int = 5, warmup: int = 1) -> Peak:
    """Time `repeat` size x size x size matmuls (2 size^3 FLOPs each) on `device`."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device, DTYPES[dtype]) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=DTYPES[dtype])
    timer = timer_for(device)
    # fp32 is FP32 math, TF32 off, as in every fp32 row it is the roofline of (like with like).
    with strict_fp32() if dtype == "fp32" else contextlib.nullcontext():
        for _ in range(warmup):
            torch.mm(a, b, out=out)
        times = sorted(timer(lambda: torch.mm(a, b, out=out)) for _ in range(repeat))
    flops = 2.0 * size**3
    return Peak(device, dtype, size, repeat, flops / times[0] / 1e6, flops / times[len(times) // 2] / 1e6)
