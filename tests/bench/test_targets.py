"""bench/targets.py and the harness's warm-up rule, on CPU: the TensorRT target skips with the reason."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ldseg.bench.harness import warmup_runs
from ldseg.bench.probe import measure_peak
from ldseg.bench.targets import FACTORIES, Context, Unsupported, build_target
from ldseg.model.config import get_preset
from ldseg.model.network import LDSeg


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Context:
    return Context(LDSeg(get_preset("demo")).eval(), "cpu", None, tmp_path_factory.mktemp("bench"), max_batch=2)


def test_capturing_backends_get_untimed_runs_up_to_the_capture():
    def backend(cuda_graph: bool, described: str = "off (CPU)") -> SimpleNamespace:
        return SimpleNamespace(cuda_graph=cuda_graph, capture_from=2, describe=lambda: {"cuda_graph": described})

    assert warmup_runs(backend(True), 0) == 2 and warmup_runs(backend(True), 3) == 3  # type: ignore[arg-type]
    assert warmup_runs(backend(False, "on (one CUDA graph per binding)"), 0) == 3  # type: ignore[arg-type]
    assert warmup_runs(backend(False), 0) == 0  # type: ignore[arg-type]


def test_tensorrt_target_is_registered_and_skips_with_a_reason(ctx: Context):
    assert "tensorrt" in FACTORIES
    with pytest.raises(Unsupported, match="TensorRT runs on an NVIDIA GPU"):
        build_target("tensorrt", ctx, "fp32")
    on_gpu = Context(ctx.model, "cuda", None, ctx.workdir)
    with pytest.raises(Unsupported, match="TensorRT is not"):  # no real TensorRT here: the reason, not a crash
        build_target("tensorrt", on_gpu, "fp32")


def test_fp32_peak_is_measured_with_tf32_off_and_leaves_the_setting_alone():
    seen = []
    original = torch.mm

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return original(*args, **kwargs)

    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        torch.mm = spy  # type: ignore[assignment]
        measure_peak("cpu", "fp32", size=16, repeat=2)
    finally:
        torch.mm = original  # type: ignore[assignment]
        still = matmul.allow_tf32
        matmul.allow_tf32 = saved
    assert seen and not any(seen) and still


def test_torch_targets_run_bf16_on_cpu_and_skip_fp16_with_the_reason(ctx: Context):
    assert build_target("torch", ctx, "bf16").backend.precision == "bf16"
    with pytest.raises(Unsupported, match="the torch backend runs fp32, bf16 on the CPU"):
        build_target("torch", ctx, "fp16")
    with pytest.raises(Unsupported, match="fp32, bf16, fp16 on a GPU"):
        build_target("torch", Context(ctx.model, "cuda", None, ctx.workdir), "int8")
