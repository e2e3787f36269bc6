"""Session-wide test settings (importable helpers live in tests/helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _private_artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Exports made by tests (and their ldseg-run subprocesses) go to a session folder, not the user's cache."""
    os.environ["LDSEG_CACHE"] = str(tmp_path_factory.mktemp("ldseg-cache"))
