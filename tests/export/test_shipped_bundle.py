"""The demo model's bundle ships with ldseg (ldseg/data/demo.bundle): it must be exactly what the
exporter writes for the shipped demo checkpoint today, and the artifact cache serves it instead of
exporting. If the first test fails after a change to the exporter or the demo model, regenerate it:

    .venv/bin/ldseg-export onnx demo -o ldseg/data/demo.bundle --overwrite
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from ldseg.export import export_bundle
from ldseg.model.checkpoint_file import read_metadata
from ldseg.runtime.artifacts.bundle import MANIFEST, load_bundle
from ldseg.runtime.artifacts.cache import ArtifactCache, BundleKey, CheckpointRef, check_bundle, shipped_bundles
from ldseg.runtime.artifacts.source import demo_checkpoint_path

REGENERATE = "regenerate it: ldseg-export onnx demo -o ldseg/data/demo.bundle --overwrite"


@pytest.fixture(scope="module")
def shipped() -> Path:
    [path] = shipped_bundles()
    return path


def demo_key() -> BundleKey:
    digest = read_metadata(demo_checkpoint_path())["content_sha256"]
    return BundleKey(digest, "demo", "fp32", 18, 1)


def test_the_shipped_bundle_is_what_the_exporter_writes_today(shipped: Path, tmp_path: Path) -> None:
    fresh = export_bundle(demo_checkpoint_path(), tmp_path / "fresh", validate=False)
    graphs = json.loads((fresh / MANIFEST).read_text())["graphs"]
    assert sorted(graphs) == sorted(load_bundle(shipped).graphs), REGENERATE
    for name, entry in graphs.items():
        assert _graph_bytes(fresh / entry["file"]) == _graph_bytes(shipped / entry["file"]), f"{name}: {REGENERATE}"


def _graph_bytes(path: Path) -> bytes:
    """The graph without per-node metadata: the exporter records stack traces with absolute source
    paths there, which differ between checkouts (a CI clone) but say nothing about what runs."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    return model.graph.SerializeToString()


def test_the_shipped_bundle_passes_the_cache_check_and_records_a_passed_validation(shipped: Path) -> None:
    check_bundle(shipped, demo_key())  # raises naming what is stale (the ldseg version, a file's hash, ...)
    assert load_bundle(shipped).validation is not None


def test_the_cache_serves_the_shipped_bundle_without_exporting(shipped: Path, tmp_path: Path) -> None:
    def never(*args: object) -> None:
        raise AssertionError("the demo was exported although its bundle ships with ldseg")

    key = demo_key()
    cache = ArtifactCache(tmp_path / "cache", build_bundle=never)
    ref = CheckpointRef(key.checkpoint_sha256, "demo", load=lambda: never())  # type: ignore[arg-type,func-returns-value]
    assert cache.bundle(ref) == shipped
    assert not (tmp_path / "cache" / "bundles").exists()
    other = ArtifactCache(tmp_path / "cache", build_bundle=never)
    with pytest.raises(AssertionError, match="exported"):  # any other checkpoint is exported as before
        other.bundle(CheckpointRef("ab" * 32, "demo", load=lambda: never()))  # type: ignore[arg-type,func-returns-value]
