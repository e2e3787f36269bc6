"""ldseg/export/compose.py: the graphs a bundle derives instead of tracing are what their parts compute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ldseg.export.specs import graph_specs
from ldseg.model.network import LDSeg
from ldseg.model.sampling import RENORM_EPS


def _run(bundle: Path, name: str, **feeds: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_decoder_argmax_is_the_argmax_of_the_decoder(demo_bundle: Path, demo_model: LDSeg) -> None:
    spec = graph_specs(demo_model.cfg)["decoder"]
    (z,) = spec.example_inputs(demo_model.cfg, 3, torch.Generator().manual_seed(7))
    probabilities = _run(demo_bundle, "decoder", z=z.numpy())
    labels = _run(demo_bundle, "decoder_argmax", z=z.numpy())
    assert labels.dtype == np.uint8
    assert len(np.unique(labels)) >= 2  # an argmax that ignored its input could not pass
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1).astype(np.uint8))


def test_denoise_step_is_the_denoiser_then_the_update(demo_bundle: Path, demo_model: LDSeg) -> None:
    """The derived step, against the bundle's denoiser and the sampler update written out in numpy."""
    spec = graph_specs(demo_model.cfg)["denoise_step"]
    z, z_image, coeffs, noise = (a.numpy() for a in spec.example_inputs(demo_model.cfg, 3, torch.Generator()))
    eps = _run(demo_bundle, "denoiser", z=z, z_image=z_image, t=coeffs[:, 0].copy())
    got = _run(demo_bundle, "denoise_step", z=z, z_image=z_image, coeffs=coeffs, noise=noise)
    c = coeffs.reshape(-1, 4, *([1] * (z.ndim - 1)))
    raw = c[:, 1] * z + c[:, 2] * eps + c[:, 3] * noise
    flat = raw.reshape(len(raw), -1).astype(np.float64)
    mean = flat.mean(axis=1, keepdims=True)
    want = (flat - mean) / (np.sqrt(((flat - mean) ** 2).mean(axis=1, keepdims=True)) + RENORM_EPS)
    np.testing.assert_allclose(got.reshape(len(got), -1), want, atol=2e-5)
    assert np.abs(got - z).max() > 0.1  # the step moved the latent: a pass-through could not pass


def test_manifest_says_what_was_derived(demo_bundle: Path) -> None:
    graphs = json.loads((demo_bundle / "manifest.json").read_text())["graphs"]
    assert graphs["decoder_argmax"]["derived_from"] == "decoder"
    assert graphs["denoise_step"]["derived_from"] == "denoiser"
    assert "derived_from" not in graphs["decoder"]
