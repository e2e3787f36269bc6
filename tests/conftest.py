"""Shared test helpers: the ../shared data folder (absent on some machines) and markers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
