"""ldseg/runtime/artifacts/bundle.py: manifest parsing, hash verification, compatibility checks.

(Kept beside the export tests because it needs their exported bundles.)"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from ldseg.errors import ArtifactError
from ldseg.model.config import get_preset
from ldseg.runtime.artifacts.bundle import Bundle, load_bundle


@pytest.fixture()
def bundle_copy(demo_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_bundle, tmp_path / "copy"))


def test_manifest_is_parsed_into_a_frozen_bundle(demo_bundle: Path) -> None:
    bundle = load_bundle(demo_bundle)
    assert isinstance(bundle, Bundle) and bundle.preset == "demo" and bundle.precision == "fp32"
    assert list(bundle.graphs) == ["encoder", "denoise_step", "denoiser", "decoder", "decoder_argmax"]
    assert bundle.graph("denoise_step").inputs[2].shape == ("batch", 4)
    assert bundle.table_array().shape == (bundle.steps, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.precision = "fp16"  # type: ignore[misc]


def test_tampered_file_is_refused_naming_it(bundle_copy: Path) -> None:
    path = bundle_copy / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="decoder.onnx: SHA-256 does not match") as info:
        load_bundle(bundle_copy)
    assert "\n" not in str(info.value)
    load_bundle(bundle_copy, verify=False)  # inspection can still read the manifest


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "encoder.onnx").unlink()
    with pytest.raises(ArtifactError, match="encoder.onnx: listed in the bundle manifest but missing"):
        load_bundle(bundle_copy)


def _edit_manifest(folder: Path, **changes: object) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_unknown_format_version_is_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, format="ldseg-bundle/99")
    with pytest.raises(ArtifactError, match="ldseg-bundle/99.*not one this ldseg reads"):
        load_bundle(bundle_copy)


def test_malformed_manifest_is_an_artifact_error(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["diffusion"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="incomplete or malformed"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not an ldseg bundle"):
        load_bundle(tmp_path)


def test_graph_without_a_hash_is_refused(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["files"]["denoiser.onnx"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="files without a hash"):
        load_bundle(bundle_copy)


def test_bundle_from_another_preset_or_shape_is_refused(demo_bundle: Path) -> None:
    bundle = load_bundle(demo_bundle)
    bundle.check_compatible("demo")
    bundle.check_compatible(get_preset("demo").with_diffusion(steps=50))  # sampler settings may differ
    bundle.check_compatible(dataclasses.replace(get_preset("demo"), class_names=("bg", "a", "b")))  # labels only
    with pytest.raises(ArtifactError, match="preset 'demo', expected 'knee3d'.*image shape"):
        bundle.check_compatible("knee3d")
    demo = get_preset("demo")
    with pytest.raises(ArtifactError, match="3 classes, expected 2"):
        bundle.check_compatible(dataclasses.replace(demo, num_classes=2))
    with pytest.raises(ArtifactError, match="architecture differs in filters"):
        bundle.check_compatible(dataclasses.replace(demo, filters=16))
