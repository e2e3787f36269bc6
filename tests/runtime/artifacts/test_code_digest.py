"""code_digest: the key of cache entries that depend on ldseg's own code (the small graphs, the torch
precision gate's verdicts) changes with any of the files it names, and is None without them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldseg.runtime.artifacts import code_digest as module


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the ldseg folder: a package `model` with two files and one lone module."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "layers.py").write_text("SCALE = 1.0\n")
    (tmp_path / "model" / "network.py").write_text("DEPTH = 4\n")
    (tmp_path / "model" / "notes.txt").write_text("not code\n")
    (tmp_path / "phantoms.py").write_text("SEED = 0\n")
    monkeypatch.setattr(module, "PACKAGE", tmp_path)
    return tmp_path


def digest(*parts: str) -> str | None:
    return module.code_digest.__wrapped__(*parts)  # uncached: the files change under the test


def test_any_changed_or_added_source_file_gives_a_new_digest(package: Path) -> None:
    before = digest("model", "phantoms.py")
    assert before is not None and len(before) == 16
    assert digest("model", "phantoms.py") == before
    (package / "model" / "notes.txt").write_text("edited\n")
    assert digest("model", "phantoms.py") == before  # only .py files are code
    (package / "model" / "layers.py").write_text("SCALE = 0.5\n")
    edited = digest("model", "phantoms.py")
    assert edited != before
    (package / "model" / "fused.py").write_text("\n")
    assert digest("model", "phantoms.py") not in (before, edited)
    (package / "phantoms.py").write_text("SEED = 1\n")
    assert digest("phantoms.py") != digest("model")


def test_without_the_sources_there_is_no_digest(package: Path) -> None:
    assert digest("model", "absent.py") is None
    (package / "empty").mkdir()
    assert digest("empty") is None  # a bytecode-only install: nothing to key by


def test_the_real_tree_has_a_digest_for_the_graph_builders_and_the_gate() -> None:
    from ldseg.runtime.artifacts.graph_cache import BUILDERS, builders_digest
    from ldseg.runtime.backends.torch.gate import GATE_CODE

    assert builders_digest() is not None and builders_digest() == module.code_digest(*BUILDERS)
    assert module.code_digest(*GATE_CODE) is not None
    assert all((module.PACKAGE / part).exists() for part in (*BUILDERS, *GATE_CODE))
