"""FLOP counts equal the closed-form conv/matmul formulas (2 FLOPs per multiply-accumulate)."""

from __future__ import annotations

import torch
from torch import nn

from ldseg.bench.flops import count_flops, pipeline_flops
from ldseg.model.config import PRESETS


def test_conv3d_flops_equal_formula():
    conv = nn.Conv3d(4, 8, kernel_size=3, bias=True)
    x = torch.randn(2, 4, 6, 7, 8)
    out_voxels = 4 * 5 * 6
    expected = 2 * 2 * 8 * out_voxels * 4 * 3**3  # 2 * B * Cout * out voxels * Cin * k^3 (bias not counted)
    assert count_flops(lambda: conv(x)) == expected


def test_grouped_strided_conv2d_flops_equal_formula():
    conv = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1, groups=4)
    x = torch.randn(1, 8, 32, 32)
    expected = 2 * 1 * 16 * (16 * 16) * (8 // 4) * 3**2
    assert count_flops(lambda: conv(x)) == expected


def test_linear_flops_equal_formula():
    linear = nn.Linear(16, 32)
    assert count_flops(lambda: linear(torch.randn(5, 16))) == 2 * 5 * 16 * 32


def test_pipeline_flops_compose_and_scale_with_batch():
    cfg = PRESETS["demo"]
    one, two = pipeline_flops(cfg, 1), pipeline_flops(cfg, 2)
    assert min(one.encoder, one.step, one.decoder) > 0
    assert (two.encoder, two.step, two.decoder) == (2 * one.encoder, 2 * one.step, 2 * one.decoder)
    stages = one.stages(15)
    assert stages["loop"] == 15 * one.step and stages["input_copy"] == stages["output_copy"] == 0
    assert one.end_to_end(15) == one.encoder + 15 * one.step + one.decoder


def test_phase_form_upsampling_flops():
    """The phase form's conv: 2^d * Cout channels of 2-tap-per-axis kernels on the (N+1)-grid
    (the kernel itself is derived once, on entering phase_upsampling)."""
    from ldseg.model.layers import Upsample, phase_upsampling

    up = Upsample(3, 4, 8)
    x = torch.randn(1, 4, 5, 6, 7)
    assert count_flops(lambda: up(x)) == 2 * 8 * (10 * 12 * 14) * 4 * 27
    with phase_upsampling(up):
        assert count_flops(lambda: up(x)) == 2 * (8 * 8) * (6 * 7 * 8) * 4 * 8
    knee = PRESETS["knee3d"]
    assert pipeline_flops(knee, 1, phase=True).decoder < 0.7 * pipeline_flops(knee, 1).decoder
