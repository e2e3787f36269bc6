"""Fixtures shared by the reliability tests: a random 'trained' demo model, as tests/test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldseg.model.checkpoint import save_checkpoint
from ldseg.model.config import PRESETS
from ldseg.model.network import COMPONENTS, LDSeg
from ldseg.runtime.backends.torch.backend import TorchBackend


@pytest.fixture(scope="package")
def demo_model() -> LDSeg:
    """Demo-preset weights, random but flagged trained: exercises the plumbing, not accuracy."""
    torch.manual_seed(0)
    return LDSeg(PRESETS["demo"], trained={name: True for name in COMPONENTS}).eval()


@pytest.fixture(scope="package")
def demo_backend(demo_model: LDSeg) -> TorchBackend:
    return TorchBackend(demo_model, "cpu")


@pytest.fixture(scope="package")
def demo_checkpoint(demo_model: LDSeg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "random.safetensors"
    save_checkpoint(demo_model, path, overwrite=False)
    return path
