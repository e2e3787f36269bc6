"""ldseg/export/fp16.py on a small module: which nodes go FP16, casts, initializers, FP32 I/O."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from torch import nn

from ldseg.export.fp16 import convert_to_fp16, fp32_scopes
from ldseg.export.specs import DenoiseStepGraph, EncoderGraph
from ldseg.model.components import ImageEncoder
from ldseg.model.config import get_preset
from ldseg.model.layers import GroupNorm, SameConv, SelfAttention
from ldseg.model.network import LDSeg

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export internals, not ours


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SameConv(2, 4, 8, 3)
        self.norm = GroupNorm(4, 8)
        self.out = SameConv(2, 8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.out(torch.relu(self.norm(self.conv(x)))), dim=1)


class Wrapper(nn.Module):
    """Body plus an FP32-only head (like the sampler update around the denoiser)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 1000.0).sum(dim=1, keepdim=True) * 2.0


@pytest.fixture(scope="module")
def exported() -> tuple[onnx.ModelProto, Wrapper, torch.Tensor]:
    torch.manual_seed(0)
    module = Wrapper().eval()
    x = torch.randn(2, 4, 16, 16)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        module,
        (x,),
        dynamo=True,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    assert program is not None
    return program.model_proto, module, x


def _types(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def test_body_in_fp16_normalization_softmax_and_head_in_fp32(
    exported: tuple[onnx.ModelProto, Wrapper, torch.Tensor],
) -> None:
    proto, module, x = exported
    lowered, stats = convert_to_fp16(proto, [Body])
    types = _types(lowered)
    by_op: dict[str, set[int]] = {}
    for node in lowered.graph.node:
        outs = {types[o] for o in node.output if types.get(o) in (TensorProto.FLOAT, TensorProto.FLOAT16)}
        by_op.setdefault(node.op_type, set()).update(outs)
    assert by_op["Conv"] == {TensorProto.FLOAT16}
    assert by_op["Relu"] == {TensorProto.FLOAT16}
    assert by_op["ReduceMean"] == {TensorProto.FLOAT}  # GroupNorm statistics
    assert by_op["Softmax"] == {TensorProto.FLOAT}
    assert by_op["ReduceSum"] == {TensorProto.FLOAT}  # the wrapper's head, outside the body
    assert [v.type.tensor_type.elem_type for v in [*lowered.graph.input, *lowered.graph.output]] == [
        TensorProto.FLOAT
    ] * 2
    conv_weights = [types[n.input[1]] for n in lowered.graph.node if n.op_type == "Conv"]
    assert conv_weights == [TensorProto.FLOAT16] * 2
    assert stats.fp16_nodes > 0 and stats.fp32_nodes > 0 and stats.casts > 0
    onnx.checker.check_model(lowered, full_check=True)

    got = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    with torch.no_grad():
        ref = module(x).numpy()
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()


def test_fp16_output_gets_a_cast_back_to_fp32(exported: tuple[onnx.ModelProto, Wrapper, torch.Tensor]) -> None:
    proto, _, x = exported
    # Everything in FP16 except the always-FP32 ops: the output is produced in FP16 and cast back.
    lowered, _ = convert_to_fp16(proto, [Wrapper])
    last = lowered.graph.node[-1]
    assert last.op_type == "Cast" and last.output[0] == "y"
    got = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    assert got.dtype == np.float32


def test_graph_without_exporter_metadata_is_refused(exported: tuple[onnx.ModelProto, Wrapper, torch.Tensor]) -> None:
    proto = onnx.ModelProto.FromString(exported[0].SerializeToString())
    for node in proto.graph.node:
        del node.metadata_props[:]
    with pytest.raises(ValueError, match="metadata"):
        convert_to_fp16(proto, [Body])


class NarrowAttention(nn.Module):
    """A conv body ending in a 1-channel attention, like glas2d's image encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = SameConv(2, 4, 1, 3)
        self.attention = SelfAttention(1, groups=1, heads=1, normalized_residual=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.conv(x))


def test_narrow_attention_blocks_stay_fp32() -> None:
    torch.manual_seed(0)
    module = NarrowAttention().eval()
    assert fp32_scopes(module) == ("attention",)
    assert fp32_scopes(EncoderGraph(ImageEncoder(get_preset("glas2d")))) == ("net.out_attention",)
    assert fp32_scopes(DenoiseStepGraph(LDSeg(get_preset("demo")))) == ()  # head dims 16 and 32: FP16

    x = torch.randn(2, 4, 8, 8)
    program = torch.onnx.export(
        module,
        (x,),
        dynamo=True,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    assert program is not None
    lowered, _ = convert_to_fp16(program.model_proto, [NarrowAttention], fp32_scopes(module))
    types = _types(lowered)
    matmuls = [types[n.output[0]] for n in lowered.graph.node if n.op_type == "MatMul"]
    assert matmuls and set(matmuls) == {TensorProto.FLOAT}
    assert {types[n.output[0]] for n in lowered.graph.node if n.op_type == "Conv"} == {TensorProto.FLOAT16}
