"""The full-size presets export and validate (random weights; slow, still run in CI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from rich.console import Console

from ldseg.export import export_bundle, validate_bundle
from ldseg.export.fp16 import convert_to_fp16, fp32_scopes
from ldseg.export.specs import graph_specs
from ldseg.export.validate import ValidationReport
from ldseg.model.config import get_preset
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import load_bundle

pytestmark = pytest.mark.slow


def _text(report: ValidationReport) -> str:
    console = Console(record=True, width=160)
    console.print(report.table())
    return console.export_text()


def test_glas2d_bundle_validates_graphs_and_pipeline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LDSeg(get_preset("glas2d")).eval()
    # Everything but the raw denoiser, whose module is also inside denoise_step (saves a trace).
    graphs = ["encoder", "denoise_step", "decoder", "decoder_argmax"]
    out = export_bundle(model, tmp_path / "glas2d.bundle", graphs=graphs, validate=False)  # validated here, at batch 1
    report = validate_bundle(out, model, batch=1)  # the dynamic batch is covered on the demo preset
    assert report.passed, _text(report)
    assert [c.graph for c in report.checks] == [*graphs, "pipeline"]

    # FP16 lowering of the encoder, whose final 1-channel attention must stay FP32 (fp16.py):
    # with these weights, measured 0.031 % of max |ref| with the rule and 0.136 % without it.
    spec = graph_specs(model.cfg)["encoder"]
    lowered, _ = convert_to_fp16(onnx.load(str(out / "encoder.onnx")), spec.fp16_body, fp32_scopes(spec.build(model)))
    image = spec.example_inputs(model.cfg, 1, torch.Generator().manual_seed(0))[0]
    got = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"image": image.numpy()}
    )[0]
    with torch.no_grad():
        ref = model.encode_image(image).numpy()
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def test_knee3d_bundle_exports_and_its_latent_graphs_match(tmp_path: Path) -> None:
    """The runtime's graphs export and pass the checker (inside export_bundle) at full size; the
    fused step is compared here. The full-resolution encoder/decoder (4M voxels, ~30 s per ORT
    call on two cores) run in test_keras_golden.py, with the official weights. The raw denoiser
    and the probability decoder are left out: the same modules are in denoise_step and
    decoder_argmax, and every export costs tens of seconds here."""
    torch.manual_seed(0)
    model = LDSeg(get_preset("knee3d")).eval()
    out = export_bundle(
        model, tmp_path / "knee3d.bundle", graphs=["encoder", "denoise_step", "decoder_argmax"], validate=False
    )  # the full-size graphs are checked in test_keras_golden.py
    bundle = load_bundle(out, trust_unvalidated=True)
    assert bundle.graph("encoder").inputs[0].shape == ("batch", 1, 128, 128, 256)
    assert bundle.graph("decoder_argmax").outputs[0].shape == ("batch", 128, 128, 256)
    assert bundle.graph("denoise_step").inputs[0].shape == ("batch", 1, 8, 8, 16)
    report = validate_bundle(out, model, graphs=["denoise_step"], pipeline=False)
    assert report.passed, _text(report)
