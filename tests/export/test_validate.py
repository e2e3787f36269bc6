"""ldseg/export/validate.py: the built-in ORT-vs-PyTorch check and its table."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from ldseg.errors import ArtifactError
from ldseg.export import validate_bundle
from ldseg.export.validate import ValidationReport, phantom_image
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import GRAPH_NAMES, load_bundle
from ldseg.runtime.backend import make_inputs
from ldseg.runtime.backends.torch.backend import TorchBackend
from tests.helpers import assert_several_classes


def _text(report: ValidationReport) -> str:
    console = Console(record=True, width=160)
    console.print(report.table())
    return console.export_text()


def _pipeline_reference(bundle_dir: Path, model: LDSeg, seed: int) -> np.ndarray:
    """The PyTorch labels the validation's pipeline row compares with (same phantom, seed and table)."""
    bundle = load_bundle(bundle_dir)
    inputs = make_inputs(model.cfg, phantom_image(model, seed), [seed], bundle.steps, bundle.sampler)
    return TorchBackend(model).run(inputs).labels


def test_fp32_bundle_passes_with_identical_pipeline_labels(demo_bundle: Path, demo_model: LDSeg) -> None:
    assert_several_classes(_pipeline_reference(demo_bundle, demo_model, 0), "pipeline reference")
    report = validate_bundle(demo_bundle, demo_model, seed=0)
    assert report.passed, _text(report)
    assert [c.graph for c in report.checks] == [*GRAPH_NAMES, "pipeline"]
    pipeline = report.pipeline_agreement
    assert pipeline is not None and pipeline >= 99.9
    for check in report.checks:
        assert check.agreement is not None or (check.max_abs is not None and check.max_abs < 1e-4), check
    text = _text(report)
    assert "pipeline" in text and "FAIL" not in text and "identical" in text


def test_fp16_bundle_passes_its_looser_targets(demo_bundle_fp16: Path, demo_model: LDSeg) -> None:
    assert_several_classes(_pipeline_reference(demo_bundle_fp16, demo_model, 1), "pipeline reference")
    report = validate_bundle(demo_bundle_fp16, demo_model, seed=1)
    assert report.passed, _text(report)
    assert report.precision == "fp16" and (report.pipeline_agreement or 0) >= 99.5


def test_a_bundle_that_does_not_match_its_model_fails(demo_bundle: Path, make_model: Callable[..., LDSeg]) -> None:
    other = make_model("demo", seed=1)  # same architecture, different weights
    report = validate_bundle(demo_bundle, other, graphs=["encoder", "decoder_argmax"], pipeline=False)
    assert not report.passed
    assert {c.graph for c in report.checks if not c.passed} == {"encoder", "decoder_argmax"}
    assert _text(report).count("FAIL") == 2


def test_model_of_another_preset_is_refused(demo_bundle: Path) -> None:
    torch.manual_seed(0)
    from ldseg.model.config import get_preset

    with pytest.raises(ArtifactError, match="expected 'glas2d'"):
        validate_bundle(demo_bundle, LDSeg(get_preset("glas2d")))


def test_large_grids_check_the_full_resolution_graphs_along_the_pipeline(
    demo_bundle: Path, demo_model: LDSeg, make_model: Callable[..., LDSeg], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond FULL_BATCH_VOXELS (knee3d) the encoder, decoder and decoder_argmax rows take the PyTorch
    pipeline's own stages as references: the same rows pass on the matching model and fail on another."""
    from ldseg.export import validate

    monkeypatch.setattr(validate, "FULL_BATCH_VOXELS", 1)  # the demo grid counts as large
    calls: list[str] = []
    monkeypatch.setattr(validate, "_check_graph", _counting(validate._check_graph, calls))
    report = validate_bundle(demo_bundle, demo_model, seed=0)
    assert report.passed, _text(report)
    assert [c.graph for c in report.checks] == [*GRAPH_NAMES, "pipeline"]
    assert sorted(calls) == ["denoise_step", "denoiser"]  # the full-resolution ones came from the pipeline
    assert (report.pipeline_agreement or 0) >= 99.9
    other = validate_bundle(demo_bundle, make_model("demo", seed=1), seed=0)
    failing = {c.graph for c in other.checks if not c.passed}
    assert {"encoder", "decoder", "decoder_argmax"} <= failing, _text(other)


def _counting(check: Callable[..., object], calls: list[str]) -> Callable[..., object]:
    def counted(bundle: object, model: object, name: str, *args: object) -> object:
        calls.append(name)
        return check(bundle, model, name, *args)

    return counted


def test_the_decoder_row_comes_from_decoder_argmax_only_when_that_is_derived_from_decoder_onnx(
    demo_bundle: Path, demo_model: LDSeg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Along the pipeline, one run of decoder_argmax (its probabilities exposed) gives both decoder
    rows, but only while decoder_argmax.onnx is byte for byte what the export derives from
    decoder.onnx: a decoder.onnx with one weight changed is then run on its own, and its row fails."""
    import onnx
    from onnx import numpy_helper

    from ldseg.export import validate
    from ldseg.export.manifest import write_manifest
    from ldseg.runtime.artifacts.bundle import MANIFEST, sha256_file

    monkeypatch.setattr(validate, "FULL_BATCH_VOXELS", 1)  # the demo grid counts as large
    sessions: list[list[str]] = []
    real_session = validate.ort.InferenceSession

    def counting(model: bytes | str, *args: object, **kwargs: object) -> object:
        session = real_session(model, *args, **kwargs)
        if isinstance(model, bytes):  # the decoder rows' sessions (the backend opens files)
            sessions.append([o.name for o in session.get_outputs()])
        return session

    monkeypatch.setattr(validate.ort, "InferenceSession", counting)
    rows = validate_bundle(demo_bundle, demo_model, graphs=["encoder", "decoder", "decoder_argmax", "denoise_step"])
    assert rows.passed, _text(rows)
    assert sessions == [["labels", "probabilities"]]  # one run for both rows

    copy = Path(shutil.copytree(demo_bundle, tmp_path / "copy"))
    decoder = onnx.load(str(copy / "decoder.onnx"))
    weight = max(decoder.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    changed = numpy_helper.to_array(weight) * np.float32(1.5)
    weight.CopyFrom(numpy_helper.from_array(changed, weight.name))
    onnx.save(decoder, str(copy / "decoder.onnx"))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["decoder.onnx"] = sha256_file(copy / "decoder.onnx")
    write_manifest(copy, manifest)
    sessions.clear()
    rows = validate_bundle(copy, demo_model, graphs=["encoder", "decoder", "decoder_argmax", "denoise_step"])
    assert sessions == [["probabilities"], ["labels"]]  # each graph on its own
    assert {c.graph for c in rows.checks if not c.passed} == {"decoder"}, _text(rows)
