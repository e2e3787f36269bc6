"""Session-wide test settings and the models and bundles many test files share (importable helpers
live in tests/helpers.py).

Exports are the slow part of the suite, so each bundle here is made once per session, and the trained
demo model's bundle is not exported at all: it ships with ldseg (ldseg/data/demo.bundle), and
tests/export/test_shipped_bundle.py checks that it is what the exporter writes today. Tests that
modify a bundle work on a copy.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.cache import shipped_bundles
from tests.helpers import informative_model


@pytest.fixture(autouse=True, scope="session")
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _private_artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Exports made by tests (and their ldseg-run subprocesses) go to a session folder, not the user's cache."""
    os.environ["LDSEG_CACHE"] = str(tmp_path_factory.mktemp("ldseg-cache"))


@pytest.fixture(scope="session")
def shipped_demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained demo model's shipped bundle (all five graphs, validated)."""
    [source] = shipped_bundles()
    assert (source / "manifest.json").is_file(), f"{source} is missing: regenerate it (README, 'The demo bundle')"
    target = tmp_path_factory.mktemp("shipped") / "demo.bundle"
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def make_model() -> Callable[..., LDSeg]:
    return informative_model


@pytest.fixture(scope="session")
def demo_model() -> LDSeg:
    """Demo-preset model with random, BN-calibrated weights (several classes on random inputs)."""
    return informative_model("demo")


@pytest.fixture(scope="session")
def demo_bundle(demo_model: LDSeg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ldseg.export import export_bundle

    return export_bundle(demo_model, tmp_path_factory.mktemp("fp32") / "demo.bundle")


# The raw denoiser is lowered exactly like the denoiser inside denoise_step; leaving it out of the
# FP16 bundle changes nothing else (the step is derived from the denoiser graph either way).
FP16_GRAPHS = ("encoder", "denoise_step", "decoder", "decoder_argmax")


@pytest.fixture(scope="session")
def demo_bundle_fp16(demo_model: LDSeg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ldseg.export import export_bundle

    out = tmp_path_factory.mktemp("fp16") / "demo.bundle"
    return export_bundle(demo_model, out, precision="fp16", graphs=FP16_GRAPHS)
