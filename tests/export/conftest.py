"""Shared fixtures: demo-preset models with random (BN-calibrated) weights and their bundles.

Exports are the slow part of these tests (~30 s per demo bundle on 2 cores), so each bundle is
exported once per session and tests that modify one work on a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ldseg.export import export_bundle
from ldseg.model.network import LDSeg
from tests.helpers import informative_model


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
