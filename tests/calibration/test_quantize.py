"""Q/DQ placement in the INT8 bundle: what TensorRT needs, and nothing around normalizations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ldseg.calibration.quantize import QUANTIZED_OPS, dedicate_qdq, qdq_pairs

NORMALIZATION_OPS = {"ReduceMean", "Sub", "Pow", "Sqrt", "Reciprocal", "BatchNormalization", "LayerNormalization",
                     "InstanceNormalization", "GroupNormalization"}  # fmt: skip
UNQUANTIZED_NEIGHBOURS = NORMALIZATION_OPS | {"Softmax", "ReduceMin", "ReduceMax", "ArgMax", "Sin", "Cos"}
GRAPHS = ("encoder", "denoise_step", "decoder", "decoder_argmax")


@pytest.fixture(scope="module")
def int8_models(calibrated) -> dict[str, onnx.ModelProto]:  # noqa: ANN001
    folder, _ = calibrated
    return {g: onnx.load(str(Path(folder) / f"{g}.onnx")) for g in GRAPHS}


@pytest.mark.parametrize("graph", GRAPHS)
def test_every_conv_and_projection_is_quantized(int8_models, graph: str) -> None:  # noqa: ANN001
    model = int8_models[graph]
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert convs
    for node in convs:
        for k in (0, 1):
            source = producer.get(node.input[k])
            assert source is not None and source.op_type == "DequantizeLinear", f"{node.name} input {k} not dequantized"
        if len(node.input) > 2 and node.input[2]:
            assert node.input[2] in inits  # bias stays a float initializer (TensorRT fuses it)

    def dequantized_weight(node: onnx.NodeProto) -> bool:
        source = producer.get(node.input[1])
        return source is not None and source.op_type == "DequantizeLinear" and source.input[0] in inits

    projections = [n for n in model.graph.node if n.op_type == "MatMul" and dequantized_weight(n)]
    if graph == "denoise_step":
        assert len(projections) == 10  # q, k and v (one matrix: fused_attention) and out, of each of 5 blocks


@pytest.mark.parametrize("graph", GRAPHS)
def test_qdq_only_in_front_of_quantized_ops(int8_models, graph: str) -> None:  # noqa: ANN001
    model = int8_models[graph]
    producer = {o: n for n in model.graph.node for o in n.output}
    pairs = qdq_pairs(model)
    assert pairs
    for pair in pairs:
        consumer_ops = {op for _, op in pair["consumers"]}
        assert consumer_ops and consumer_ops <= set(QUANTIZED_OPS), f"{pair['dq']} feeds {pair['consumers']}"
        assert pair["source_op"] not in UNQUANTIZED_NEIGHBOURS, (
            f"{pair['dq']} quantizes the output of {pair['source_op']}"
        )
    # No Q reads a normalization / Softmax output, no normalization reads a DQ output.
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            source = producer.get(node.input[0])
            assert source is None or source.op_type not in UNQUANTIZED_NEIGHBOURS
        if node.op_type in UNQUANTIZED_NEIGHBOURS:
            for name in node.input:
                source = producer.get(name)
                assert source is None or source.op_type not in ("DequantizeLinear", "QuantizeLinear"), node.name


@pytest.mark.parametrize("graph", GRAPHS)
def test_symmetric_int8_with_per_channel_weights(int8_models, graph: str) -> None:  # noqa: ANN001
    model = int8_models[graph]
    inits = {i.name: i for i in model.graph.initializer}
    for pair in qdq_pairs(model):
        zero = pair["zero_point"]
        assert zero is not None and zero.dtype == np.int8 and not zero.any(), f"{pair['dq']}: zero point {zero}"
        if pair["kind"] == "activation":
            assert pair["scale"].size == 1  # per-tensor activations
            continue
        weight = numpy_helper.to_array(inits[pair["weight"]])
        assert weight.dtype == np.int8
        op = pair["consumers"][0][1]
        axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1, "Gemm": 0}[op]
        assert pair["axis"] == axis
        assert pair["scale"].shape == (weight.shape[axis],) and (pair["scale"] > 0).all()


def test_io_stays_float32(int8_models, fp32_bundle: Path) -> None:  # noqa: ANN001
    for graph, model in int8_models.items():
        ref = onnx.load(str(fp32_bundle / f"{graph}.onnx"), load_external_data=False)
        sig = [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]
        assert sig == [(v.name, v.type.tensor_type.elem_type) for v in [*ref.graph.input, *ref.graph.output]]
        batch_dims = [v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.input]
        assert set(batch_dims) == {"batch"}
        assert {p.key: p.value for p in model.metadata_props}["ldseg.precision"] == "int8"


def test_dedicate_qdq_rewires_other_consumers() -> None:
    """x feeds a quantized Conv and a (GroupNorm-like) ReduceMean: after ORT both read DQ(Q(x));
    after dedicate_qdq the ReduceMean reads x again."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "m")]
    inits = [
        numpy_helper.from_array(np.float32(0.1), "s"),
        numpy_helper.from_array(np.int8(0), "zp"),
        numpy_helper.from_array(np.ones((1, 1, 1, 1), np.int8), "w_q"),
        numpy_helper.from_array(np.float32([0.5]), "w_s"),
        numpy_helper.from_array(np.int8([0]), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"], name="q"),
        helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["x_dq"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="w_dq", axis=0),
        helper.make_node("Conv", ["x_dq", "w"], ["y"], name="conv"),
        helper.make_node("ReduceMean", ["x_dq"], ["m"], name="norm", keepdims=1),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits))
    assert dedicate_qdq(model, {"conv"}) == 1
    by_name = {n.name: n for n in model.graph.node}
    assert list(by_name["norm"].input) == ["x"] and list(by_name["conv"].input) == ["x_dq", "w"]
    assert dedicate_qdq(model, set()) == 1  # nothing quantized: the pair is dropped entirely
    assert {n.op_type for n in model.graph.node} == {"DequantizeLinear", "Conv", "ReduceMean"}


def test_percentile_quantizes_the_step(fp32_bundle: Path, tmp_path: Path) -> None:
    from ldseg.calibration.data import batches, collect, load_volumes
    from ldseg.calibration.quantize import quantize_graph
    from ldseg.runtime.artifacts.bundle import load_bundle

    bundle = load_bundle(fp32_bundle)
    calib, _ = load_volumes("phantoms", bundle.config, max_volumes=1, holdout=1)
    feeds = collect(bundle, calib, threads=2).feeds["denoise_step"]
    result = quantize_graph(
        "denoise_step", bundle.graph_path("denoise_step"), tmp_path / "q.onnx", batches(feeds), method="percentile"
    )
    assert result.quantized == {"Conv": 29, "MatMul": 10} and result.preprocessed  # q, k, v one matrix
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert all(not p["zero_point"].any() for p in qdq_pairs(model))


def _tiny_conv(path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 8, 8])
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(2, 2, 3, 3)).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["c"], ["y"], name="relu")
    model = helper.make_model(
        helper.make_graph([conv, relu], "tiny", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 18)]
    )
    onnx.save(model, str(path))


def test_methods_give_their_own_ranges(tmp_path: Path) -> None:
    """Heavy-tailed data: entropy and percentile clip the outliers, min-max keeps them. (ORT's
    default entropy settings would reduce to min-max; see ENTROPY_BINS.)"""
    from ldseg.calibration.quantize import quantize_graph

    _tiny_conv(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_t(2, size=(4, 2, 8, 8)).astype(np.float32)} for _ in range(3)]
    scale = {}
    for method in ("minmax", "entropy", "percentile"):
        target = tmp_path / f"{method}.onnx"
        quantize_graph("tiny", tmp_path / "tiny.onnx", target, feeds, method=method)
        (act,) = [p for p in qdq_pairs(onnx.load(str(target))) if p["kind"] == "activation"]
        scale[method] = float(act["scale"])
    assert scale["entropy"] < scale["minmax"] and scale["percentile"] < scale["minmax"], scale
    with pytest.raises(ValueError, match="choose one of"):
        quantize_graph("tiny", tmp_path / "tiny.onnx", tmp_path / "x.onnx", feeds, method="kl")
