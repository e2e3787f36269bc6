"""ldseg/export/onnx_export.py: one graph exported, checked, with the right signature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ldseg.errors import ArtifactError
from ldseg.export import onnx_export
from ldseg.export.onnx_export import export_graph
from ldseg.export.specs import BATCH_AXIS, graph_specs
from ldseg.model.config import get_preset
from ldseg.model.layers import GroupNorm, SelfAttention, Upsample
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import GRAPH_NAMES, load_bundle


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_passes_checker_with_spec_signature(demo_bundle: Path, demo_model: LDSeg, name: str) -> None:
    proto = onnx.load(str(demo_bundle / f"{name}.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    spec = graph_specs(demo_model.cfg)[name]
    for values, tensors in ((proto.graph.input, spec.inputs), (proto.graph.output, spec.outputs)):
        assert [v.name for v in values] == [t.name for t in tensors]
        for value, tensor in zip(values, tensors):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == list(tensor.shape) and dims[0] == BATCH_AXIS  # dynamic batch, static rest
    ops = {n.op_type for n in proto.graph.node}
    assert "GroupNormalization" not in ops  # decomposed for TensorRT (#4336/#4756)
    assert load_bundle(demo_bundle).graph(name).exporter == "dynamo"


def test_graphs_carry_their_pre_and_post_processing(demo_bundle: Path) -> None:
    def ops(name: str) -> set[str]:
        return {n.op_type for n in onnx.load(str(demo_bundle / f"{name}.onnx")).graph.node}

    assert {"ReduceMin", "ReduceMax"} <= ops("encoder")  # per-sample min-max inside the graph
    assert {"ArgMax", "Cast"} <= ops("decoder_argmax")
    assert "Softmax" in ops("decoder")


def test_the_denoisers_group_norms_are_one_instance_normalization_each_the_encoders_stay_written_out(
    demo_bundle: Path, demo_model: LDSeg
) -> None:
    """Issue 31: the launch-bound step gets 5 nodes per GroupNorm instead of 14; the image encoder's
    full-resolution groups keep the two-level statistics (layers.GroupNorm)."""

    def ops(name: str) -> list[str]:
        return [n.op_type for n in onnx.load(str(demo_bundle / f"{name}.onnx")).graph.node]

    norms = sum(isinstance(m, GroupNorm) for m in demo_model.denoiser.modules())
    assert norms > 0
    for name in ("denoise_step", "denoiser"):
        assert ops(name).count("InstanceNormalization") == norms
        assert "Reciprocal" not in ops(name)  # the written-out form's rsqrt
    assert "ReduceMean" not in ops("denoiser")  # (the step's two are its renormalization's)
    assert "InstanceNormalization" not in ops("encoder") and "Pow" in ops("encoder")


def test_the_phase_form_upsampling_interleaves_with_one_transpose_and_a_crop(
    demo_bundle: Path, demo_model: LDSeg
) -> None:
    """Per Upsample: one conv, reshape-transpose-reshape and a three-axis crop; no slice per parity
    (layers.Upsample; the decoder has nothing else that slices or concatenates)."""
    ops = [n.op_type for n in onnx.load(str(demo_bundle / "decoder.onnx")).graph.node]
    ups = sum(isinstance(m, Upsample) for m in demo_model.label_decoder.modules())
    assert ups > 0
    assert ops.count("Slice") == 3 * ups and "Concat" not in ops and "Unsqueeze" not in ops


def test_a_one_head_attention_block_exports_no_head_axis(demo_bundle: Path, demo_model: LDSeg) -> None:
    """The denoiser's attention has one head: tokens in, keys transposed, tokens out are its only
    transposes (layers.SelfAttention), plus one per phase-form Upsample."""
    ops = [n.op_type for n in onnx.load(str(demo_bundle / "denoiser.onnx")).graph.node]
    blocks = [m for m in demo_model.denoiser.modules() if isinstance(m, SelfAttention)]
    assert blocks and all(block.heads == 1 for block in blocks)
    ups = sum(isinstance(m, Upsample) for m in demo_model.denoiser.modules())
    assert ops.count("Transpose") == 3 * len(blocks) + ups
    # q, k, v as one matrix (layers.fused_attention): one MatMul for them, then q.k, weights.v and
    # the projection; one Split; the softmax scale is in q's weights (no Mul before the Softmax)
    assert ops.count("MatMul") == 4 * len(blocks) and ops.count("Split") == len(blocks)
    graph = onnx.load(str(demo_bundle / "denoiser.onnx")).graph
    producers = {out: n for n in graph.node for out in n.output}
    assert all(producers[n.input[0]].op_type == "MatMul" for n in graph.node if n.op_type == "Softmax")


def test_torchscript_fallback_is_announced_and_recorded(
    demo_model: LDSeg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> onnx.ModelProto:
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    spec = graph_specs(demo_model.cfg)["decoder"]
    with pytest.warns(RuntimeWarning, match="falling back to the TorchScript exporter"):
        result = export_graph(spec, demo_model, tmp_path / spec.file, opset=18, batch=1)
    assert result.exporter == "torchscript"
    assert result.fallback_reason is not None and "simulated dynamo failure" in result.fallback_reason
    z = spec.example_inputs(demo_model.cfg, 3, torch.Generator().manual_seed(0))[0]
    got = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, {"z": z.numpy()})[0]
    with torch.no_grad():
        ref = demo_model.label_decoder(z).numpy()
    assert np.abs(got - ref).max() < 1e-5


def test_a_specialized_batch_axis_is_refused() -> None:
    value = onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 1, 4, 8, 8])
    spec = graph_specs(get_preset("demo"))["decoder"]
    with pytest.raises(ArtifactError, match="batch must stay dynamic"):
        onnx_export._check_value("decoder", value, spec.inputs[0])
