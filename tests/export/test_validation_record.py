"""Validation is part of the bundle: the manifest records the table and verdict (exporter.py,
validate.py, manifest.py), a failed bundle is written only when asked, and loaders refuse a bundle
whose manifest records a failed validation or none (runtime/artifacts/bundle.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ldseg.errors import ArtifactError
from ldseg.export import export_bundle, validate
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import load_bundle
from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
from ldseg.runtime.select import Source, select_backend


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _rewrite(folder: Path, **changes: object) -> None:
    manifest = _manifest(folder)
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_records_the_validation_table(demo_bundle: Path) -> None:
    record = _manifest(demo_bundle)["validation"]
    assert record["verdict"] == "passed" and record["tolerance"]["rel"] == validate.TOLERANCES["fp32"].rel
    rows = {(c["graph"], c["passed"]) for c in record["checks"]}
    graphs = {"encoder", "denoise_step", "denoiser", "decoder", "decoder_argmax", "pipeline"}
    assert {g for g, _ in rows} == graphs and all(passed for _, passed in rows)
    pipeline = next(c for c in record["checks"] if c["graph"] == "pipeline")
    assert pipeline["agreement"] >= 99.9
    assert load_bundle(demo_bundle).validation == record


@pytest.mark.parametrize("verdict", [None, "failed"])
def test_unvalidated_or_failed_bundle_is_refused_in_one_sentence(
    demo_bundle: Path, tmp_path: Path, verdict: str | None
) -> None:
    folder = Path(shutil.copytree(demo_bundle, tmp_path / "b"))
    record = None if verdict is None else {**_manifest(folder)["validation"], "verdict": verdict, "summary": "fails x"}
    trained = dict.fromkeys(_manifest(folder)["trained"], True)  # the fixture's weights are random; runnable here
    _rewrite(folder, validation=record, trained=trained)
    with pytest.raises(ArtifactError, match="--trust-unvalidated") as info:
        load_bundle(folder)
    message = str(info.value)
    assert str(folder) in message and "\n" not in message and message.count(". ") == 0
    assert ("failed its validation (fails x)" in message) if verdict else ("records no validation" in message)
    with pytest.raises(ArtifactError, match="--trust-unvalidated"):
        OnnxRuntimeBackend(folder)  # every loader goes through load_bundle
    with pytest.raises(ArtifactError, match="--trust-unvalidated"):
        select_backend(Source(bundle=folder), "auto", "cpu")
    assert load_bundle(folder, trust_unvalidated=True).validation == record
    chosen = select_backend(Source(bundle=folder, trust_unvalidated=True), "auto", "cpu")
    assert chosen.backend.name in ("openvino", "onnxruntime")  # the first CPU bundle backend installed here


def test_failed_export_leaves_nothing_unless_kept(
    demo_model: LDSeg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tolerance nothing can meet: the decoder_argmax labels would have to be 100.1 % identical.
    impossible = validate.Tolerance(rel=0.0, atol=0.0, agreement=100.1)
    monkeypatch.setitem(validate.TOLERANCES, "fp32", impossible)
    reports = []
    target = tmp_path / "failed"
    with pytest.raises(ArtifactError, match="not written: .*fails decoder_argmax .*--keep-failed"):
        export_bundle(demo_model, target, graphs=["decoder_argmax"], on_validated=reports.append)
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no temp folder either
    assert len(reports) == 1 and not reports[0].passed and reports[0].bundle == target

    kept = export_bundle(demo_model, target, graphs=["decoder_argmax"], keep_failed=True)
    record = _manifest(kept)["validation"]
    assert record["verdict"] == "failed" and record["checks"][0]["agreement"] <= 100.0
    with pytest.raises(ArtifactError, match="failed its validation"):
        load_bundle(kept)


def test_export_without_validation_records_no_verdict(demo_model: LDSeg, tmp_path: Path) -> None:
    out = export_bundle(demo_model, tmp_path / "b", graphs=["decoder_argmax"], validate=False)
    assert "validation" not in _manifest(out)
    with pytest.raises(ArtifactError, match="records no validation"):
        load_bundle(out)
