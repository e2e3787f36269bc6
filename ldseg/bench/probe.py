"""The device's measured matmul peak per precision: the roofline every achieved GFLOP/s is compared with.

FP32, FP16 and BF16 are timed as torch matmuls; on CPU, where OpenVINO is installed, FP32, BF16 and
INT8 are also timed as one OpenVINO MatMul (BF16 through its inference-precision hint, INT8 as a
FakeQuantize-d MatMul that OpenVINO runs with its VNNI/AMX integer kernels), and the faster library
sets the peak. INT8 has no torch path worth timing here: torch._int_mm on CPU reached half of
OpenVINO's INT8 rate on the 2-core EPYC. Each row's roofline then divides by its own precision's peak.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ldseg.bench.timing import timer_for
from ldseg.runtime.backends.torch.backend import strict_fp32

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPENVINO_DTYPES = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class Peak:
    device: str
    dtype: str
    size: int  # square matmuls of size x size
    repeat: int
    gflops: float  # best of `repeat` (the attainable peak); GOP/s for int8
    median_gflops: float
    library: str = "torch"  # which library's matmul reached it

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


def measure_openvino_peak(
    dtype: str, size: int = 2048, repeat: int = 5, warmup: int = 1, threads: int | None = None
) -> Peak | None:
    """The same matmul as one OpenVINO CPU graph; None where openvino is not installed."""
    try:
        import openvino as ov
        from openvino import opset13 as ops
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    x = ops.parameter([size, size], ov.Type.f32, name="x")
    w: Any = ops.constant(rng.standard_normal((size, size)).astype(np.float32))
    lhs: Any = x
    if dtype == "int8":  # symmetric 8-bit ranges: OpenVINO's low-precision pass makes it an int8 MatMul
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        lhs, w = ops.fake_quantize(x, lo, hi, lo, hi, 256), ops.fake_quantize(w, lo, hi, lo, hi, 255)
    model = ov.Model([ops.matmul(lhs, w, False, False)], [x], "peak")
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": "bf16" if dtype == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    request.set_input_tensor(ov.Tensor(rng.standard_normal((size, size)).astype(np.float32)))
    timer = timer_for("cpu")
    for _ in range(warmup):
        request.infer()
    times = sorted(timer(request.infer) for _ in range(repeat))
    flops = 2.0 * size**3
    return Peak("cpu", dtype, size, repeat, flops / times[0] / 1e6, flops / times[len(times) // 2] / 1e6, "openvino")


def best_peak(device: str, dtype: str, size: int = 2048, repeat: int = 5) -> Peak:
    """The faster of torch's and (on CPU) OpenVINO's matmul at `dtype`."""
    candidates = []
    if dtype in DTYPES:
        candidates.append(measure_peak(device, dtype, size, repeat))
    if device == "cpu" and dtype in OPENVINO_DTYPES:
        found = measure_openvino_peak(dtype, size, repeat, threads=torch.get_num_threads())
        if found is not None:
            candidates.append(found)
    if not candidates:
        raise ValueError(f"no matmul probe for {dtype} on {device}")
    return max(candidates, key=lambda peak: peak.gflops)
