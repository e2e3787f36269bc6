"""Shared test helpers: the ../shared data folder (absent on some machines) and markers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ldseg.model.config import get_preset
from ldseg.model.network import LDSeg

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
OFFICIAL = SHARED_DATA / "official-keras-weights"


@pytest.fixture(autouse=True, scope="session")
def _two_threads() -> None:
    torch.set_num_threads(2)


def shared_or_skip(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data checks need ../shared beside the repository")
    return path


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
