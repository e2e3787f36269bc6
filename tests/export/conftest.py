"""Shared fixtures: demo-preset models with random (BN-calibrated) weights and their bundles.

Exports are the slow part of these tests (~30 s per demo bundle on 2 cores), so each bundle is
exported once per session and tests that modify one work on a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ldseg.export import export_bundle
from ldseg.model.config import get_preset
from ldseg.model.network import LDSeg


def informative_model(preset: str, seed: int = 0) -> LDSeg:
    """Random weights, with every BatchNorm calibrated on random inputs.

    Untrained decoders put every voxel in one class (their logits barely vary), which would make
    label-agreement checks trivially 100 %; calibrated BN statistics give O(1) logits that vary
    across the volume, so the checks see real class boundaries and near-ties."""
    torch.manual_seed(seed)
    model = LDSeg(get_preset(preset))
    cfg = model.cfg
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(2):
            model.image_encoder(torch.rand((2, *cfg.image_shape), generator=gen))
            model.label_decoder(torch.randn((2, *cfg.latent_shape), generator=gen))
            model.encode_label(torch.randint(0, cfg.num_classes, (2, *cfg.image_size), generator=gen))
    return model.eval()


@pytest.fixture(scope="session")
def make_model() -> Callable[..., LDSeg]:
    return informative_model


@pytest.fixture(scope="session")
def demo_model() -> LDSeg:
    return informative_model("demo")


@pytest.fixture(scope="session")
def demo_bundle(demo_model: LDSeg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(demo_model, tmp_path_factory.mktemp("fp32") / "demo.bundle")


# The raw denoiser is lowered exactly like the denoiser inside denoise_step; leaving it out of the
# FP16 bundle saves one export (the slowest graph to trace).
FP16_GRAPHS = ("encoder", "denoise_step", "decoder", "decoder_argmax")


@pytest.fixture(scope="session")
def demo_bundle_fp16(demo_model: LDSeg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "demo.bundle"
    return export_bundle(demo_model, out, precision="fp16", graphs=FP16_GRAPHS)
