"""ONNX Runtime (CPU) vs PyTorch, graph by graph, on fresh random inputs (tolerances stated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ldseg.export.specs import graph_specs
from ldseg.model.diffusion import sampler_step, sampler_table, table_tensor
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import GRAPH_NAMES
from tests.helpers import assert_several_classes

FP16_GRAPHS = ("encoder", "denoise_step", "decoder", "decoder_argmax")  # as exported in conftest.py
# FP32: max abs error on latents/probabilities (values are O(1)); FP16: relative to max |ref|.
FP32_ATOL = 1e-4
FP16_REL = 2e-2


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(bundle: Path, name: str, args: tuple[torch.Tensor, ...], model: LDSeg) -> np.ndarray:
    spec = graph_specs(model.cfg)[name]
    feeds = {n: a.numpy() for n, a in zip(spec.input_names, args)}
    out: np.ndarray = _session(bundle / spec.file).run(None, feeds)[0]
    return out


def _reference(model: LDSeg, name: str, args: tuple[torch.Tensor, ...]) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = graph_specs(model.cfg)[name].build(model).eval()(*args).numpy()
    return out


def _inputs(model: LDSeg, name: str, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    return graph_specs(model.cfg)[name].example_inputs(model.cfg, batch, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_fp32_graph_matches_pytorch(demo_bundle: Path, demo_model: LDSeg, name: str) -> None:
    args = _inputs(demo_model, name, 2, seed=11)
    got, ref = _run(demo_bundle, name, args, demo_model), _reference(demo_model, name, args)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.dtype == np.uint8:
        assert_several_classes(ref, f"{name}: PyTorch labels")
        agreement = (got == ref).mean() * 100
        assert agreement >= 99.9, f"{name}: {agreement:.3f} % identical labels"
    else:
        err = np.abs(got - ref).max()
        assert err <= FP32_ATOL, f"{name}: max abs error {err:.3g} > {FP32_ATOL}"


@pytest.mark.parametrize("name", FP16_GRAPHS)
def test_fp16_graph_matches_pytorch_within_fp16_tolerance(demo_bundle_fp16: Path, demo_model: LDSeg, name: str) -> None:
    args = _inputs(demo_model, name, 2, seed=12)
    got, ref = _run(demo_bundle_fp16, name, args, demo_model), _reference(demo_model, name, args)
    assert got.dtype == ref.dtype and got.shape == ref.shape  # FP32 I/O (keep_io_types)
    if ref.dtype == np.uint8:
        assert_several_classes(ref, f"{name}: PyTorch labels")
        agreement = (got == ref).mean() * 100
        assert agreement >= 99.5, f"{name}: {agreement:.3f} % identical labels"
    else:
        err, scale = np.abs(got - ref).max(), np.abs(ref).max()
        assert err <= FP16_REL * scale, f"{name}: max abs error {err:.3g} > {FP16_REL} x {scale:.3g}"


def test_fused_step_is_one_pytorch_sampler_step(demo_bundle: Path, demo_model: LDSeg) -> None:
    """denoise_step(z, z_image, row_i, noise) == renormalize(a z + b eps(z, z_image, t) + c noise),
    for real DDPM rows (c != 0, so the noise path is exercised) early, midway and late in the loop."""
    cfg = demo_model.cfg
    table = table_tensor(sampler_table(cfg.diffusion, 10, "ddpm"))
    gen = torch.Generator().manual_seed(3)
    z, z_image, noise = (torch.randn((3, *cfg.latent_shape), generator=gen) for _ in range(3))
    coeffs = table[[0, 4, 7]]
    assert float(coeffs[:, 3].abs().min()) > 0
    got = _run(demo_bundle, "denoise_step", (z, z_image, coeffs, noise), demo_model)
    with torch.no_grad():
        eps = demo_model.denoiser(z, z_image, coeffs[:, 0])
        ref = sampler_step(z, eps, noise, coeffs).numpy()
    assert np.abs(got - ref).max() <= FP32_ATOL
    # The same step composed from the raw denoiser graph: the two graphs agree.
    eps_onnx = torch.from_numpy(_run(demo_bundle, "denoiser", (z, z_image, coeffs[:, 0].contiguous()), demo_model))
    composed = sampler_step(z, eps_onnx, noise, coeffs).numpy()
    assert np.abs(got - composed).max() <= FP32_ATOL


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_batch_of_two_equals_two_single_runs(demo_bundle: Path, demo_model: LDSeg, name: str) -> None:
    args = _inputs(demo_model, name, 2, seed=13)
    both = _run(demo_bundle, name, args, demo_model)
    singles = [_run(demo_bundle, name, tuple(a[i : i + 1] for a in args), demo_model) for i in range(2)]
    np.testing.assert_allclose(both, np.concatenate(singles), rtol=0, atol=1e-5)


def _float_inputs(node: onnx.NodeProto, types: dict[str, int]) -> list[int]:
    return [types[i] for i in node.input if i and types.get(i) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]


@pytest.mark.parametrize("name", FP16_GRAPHS)
def test_fp16_graph_keeps_precision_sensitive_parts_in_fp32(demo_bundle_fp16: Path, name: str) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(demo_bundle_fp16 / f"{name}.onnx")))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8), value.name
    fp32_ops = {"Softmax", "ReduceMean", "BatchNormalization", "Sin", "Cos", "ReduceMin", "ReduceMax", "Sqrt"}
    for node in graph.node:
        if node.op_type in fp32_ops:
            assert set(_float_inputs(node, types)) == {onnx.TensorProto.FLOAT}, f"{node.name} ({node.op_type}) not FP32"
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert convs and all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)  # weights in FP16
