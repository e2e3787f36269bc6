"""ldseg/export/exporter.py + manifest.py: the bundle folder, its manifest, atomic writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldseg.errors import OutputError
from ldseg.export import export_bundle, exporter
from ldseg.model.checkpoint import save_checkpoint
from ldseg.model.diffusion import sampler_table
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import BUNDLE_FORMAT, GRAPH_NAMES, sha256_file


def test_manifest_records_everything(demo_bundle: Path, demo_model: LDSeg) -> None:
    manifest = json.loads((demo_bundle / "manifest.json").read_text())
    cfg = demo_model.cfg
    assert manifest["format"] == BUNDLE_FORMAT
    assert manifest["preset"] == "demo" and manifest["config"] == json.loads(cfg.to_json())
    assert manifest["precision"] == "fp32" and manifest["opset"] == 18 and manifest["batch"] == 1
    assert manifest["shapes"] == {
        "image": list(cfg.image_shape),
        "latent": list(cfg.latent_shape),
        "labels": list(cfg.image_size),
        "num_classes": 3,
    }
    assert list(manifest["graphs"]) == sorted(GRAPH_NAMES)
    step = manifest["graphs"]["denoise_step"]
    assert [t["name"] for t in step["inputs"]] == ["z", "z_image", "coeffs", "noise"]
    assert step["inputs"][2]["shape"] == ["batch", 4] and step["outputs"][0]["name"] == "z_next"
    assert manifest["graphs"]["decoder_argmax"]["outputs"][0]["dtype"] == "uint8"
    assert all(g["exporter"] == "dynamo" for g in manifest["graphs"].values())
    diffusion = manifest["diffusion"]
    assert diffusion["sampler"] == "ddim" and diffusion["steps"] == 15 and diffusion["schedule"] == "cosine"
    np.testing.assert_array_equal(np.asarray(diffusion["table"]), sampler_table(cfg.diffusion).rows)
    assert {"ldseg", "torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert manifest["checkpoint_hash"] is None  # exported from an in-memory model
    files = sorted(p.name for p in demo_bundle.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files == sorted(f"{g}.onnx" for g in GRAPH_NAMES)
    assert all(manifest["files"][f] == sha256_file(demo_bundle / f) for f in files)
    assert demo_bundle.stat().st_mode & 0o755 == 0o755  # readable like a plain mkdir, not mkdtemp's 0700


def test_export_from_checkpoint_records_its_hash(demo_model: LDSeg, tmp_path: Path) -> None:
    digest = save_checkpoint(demo_model, tmp_path / "demo.safetensors", overwrite=False)
    out = export_bundle(tmp_path / "demo.safetensors", tmp_path / "b", graphs=["decoder_argmax"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint_hash"] == digest
    assert list(manifest["graphs"]) == ["decoder_argmax"] and list(manifest["files"]) == ["decoder_argmax.onnx"]


def test_existing_target_is_refused_without_overwrite(demo_model: LDSeg, tmp_path: Path) -> None:
    target = tmp_path / "b"
    export_bundle(demo_model, target, graphs=["decoder"])
    before = sha256_file(target / "manifest.json")
    with pytest.raises(OutputError, match="exists"):
        export_bundle(demo_model, target, graphs=["decoder"])
    assert sha256_file(target / "manifest.json") == before
    export_bundle(demo_model, target, graphs=["decoder_argmax"], overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["decoder_argmax.onnx", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp or backup folders left


def test_overwrite_never_replaces_a_folder_that_is_not_a_bundle(demo_model: LDSeg, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="refusing to replace a folder ldseg did not write"):
        export_bundle(demo_model, tmp_path, overwrite=True, graphs=["decoder"])
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_failed_export_leaves_nothing(demo_model: LDSeg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(spec, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated failure in the second graph")

    # decoder is traced and written first; decoder_argmax, derived from it, fails.
    monkeypatch.setattr(exporter, "derive_graph", fail)
    with pytest.raises(RuntimeError, match="second graph"):
        export_bundle(demo_model, tmp_path / "b", graphs=["decoder", "decoder_argmax"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"opset": 17}, "opset 17"),
        ({"precision": "int8"}, "precision"),
        ({"batch": 0}, "batch"),
        ({"graphs": ["x"]}, "unknown graphs"),
    ],
)
def test_unsupported_options_are_refused_before_any_work(
    demo_model: LDSeg, tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        export_bundle(demo_model, tmp_path / "b", **options)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_export_puts_a_model_in_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    from ldseg.model.config import get_preset

    model = LDSeg(get_preset("demo")).train()
    export_bundle(model, tmp_path / "b", graphs=["decoder"])
    assert not model.training
