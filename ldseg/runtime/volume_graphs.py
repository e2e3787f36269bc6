"""The volume operations (ldseg/runtime/volume_ops.py) as three small ONNX graphs, in two arithmetics:
ONNX Runtime runs them in float64 (volume_ops.EXACT), TensorRT in float32 (volume_ops.FLOAT32: it has
no float64 tensors).

The graphs are built here with onnx.helper, not exported into each bundle: they hold no weights and
are the same for every model, so code is their one definition (tests/runtime/backends/
test_volume_ops.py holds both arithmetics to the CPU path); ONNX Runtime keeps them serialized in
the artifact cache, keyed by this module's source (ldseg/runtime/artifacts/graph_cache.py). Each is
separable linear interpolation at scipy.ndimage.zoom's own coordinates, i * (in - 1) / (out - 1) per
axis (ldseg.io.preprocess.zoom_coordinates): the host computes, per axis, the two source indices and
the weight of every output index (volume_ops.axis_feeds: a few hundred numbers), and the graph
gathers and blends along each axis, rounding to float32 once at the end. ONNX `Resize` is not used:
ONNX Runtime's CPU Resize has no float64 kernel, and in float32 it moved the knee's model-grid image
by up to 1.6e-6 from scipy's.
- to_model_grid: volume (X, Y, Z) float32 -> min-max in float32 as the official code -> (D, H, W);
  also returns the peak and the sum, so a constant or NaN volume is refused in the CPU path's words
  (ONNX Runtime's ReduceMin skips NaN where numpy's min returns it);
- class_step: one class's probabilities (D, H, W) resampled to the input grid and folded into a
  running best value and class index there (a class replaces the best only where strictly greater:
  the first class wins ties, as np.argmax); run once per class, so the device holds one class's
  resampling and two input-grid maps whatever the number of classes. In FLOAT32 the running index
  is int32 (TensorRT selects no uint8) and the step also writes it as uint8 `labels`;
- map: one float map (D, H, W) -> float32 (X, Y, Z).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from ldseg.runtime.volume_ops import EXACT, Arithmetic

OPSET = 18
_TO_MODEL = (2, 1, 0)  # nibabel (X, Y, Z) <-> model (D, H, W)
_NUMPY: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.UINT8: "uint8",
}


# The blend's and indices' types of each arithmetic (volume_ops.Arithmetic names them as numpy does).
_PROTO = {name: proto for proto, name in _NUMPY.items()}


def _axis_inputs(axis: int, rank: int, a: Arithmetic) -> list[onnx.ValueInfoProto]:
    shape: list[int | str | None] = [1] * rank
    shape[axis] = f"n{axis}"
    return [
        helper.make_tensor_value_info(f"i0_{axis}", _PROTO[a.index_dtype], [f"n{axis}"]),
        helper.make_tensor_value_info(f"i1_{axis}", _PROTO[a.index_dtype], [f"n{axis}"]),
        helper.make_tensor_value_info(f"w_{axis}", _PROTO[a.weight_dtype], shape),
    ]


def _blend(nodes: list[onnx.NodeProto], x: str, axis: int) -> str:
    """x resampled along `axis`: x[i0] + (x[i1] - x[i0]) * w, in x's type."""
    p = f"a{axis}_"
    nodes += [
        helper.make_node("Gather", [x, f"i0_{axis}"], [p + "low"], axis=axis),
        helper.make_node("Gather", [x, f"i1_{axis}"], [p + "high"], axis=axis),
        helper.make_node("Sub", [p + "high", p + "low"], [p + "step"]),
        helper.make_node("Mul", [p + "step", f"w_{axis}"], [p + "part"]),
        helper.make_node("Add", [p + "low", p + "part"], [p + "out"]),
    ]
    return p + "out"


def _resample(nodes: list[onnx.NodeProto], x: str, a: Arithmetic) -> str:
    """x (float32) blended along its three axes in `a`'s type, back to float32."""
    out, wide = x, a.weight_dtype != "float32"
    if wide:
        nodes.append(helper.make_node("Cast", [x], ["x_wide"], to=_PROTO[a.weight_dtype]))
        out = "x_wide"
    for axis in range(3):
        out = _blend(nodes, out, axis)
    if wide:
        nodes.append(helper.make_node("Cast", [out], ["resampled"], to=TensorProto.FLOAT))
        out = "resampled"
    return out


def small_model(nodes: list[onnx.NodeProto], name: str, inputs: list, outputs: list) -> onnx.ModelProto:
    """A checked model of `nodes` at OPSET (the volume and sample graphs)."""
    model = helper.make_model(
        helper.make_graph(nodes, name, inputs, outputs), opset_imports=[helper.make_opsetid("", OPSET)]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def to_model_grid_graph(a: Arithmetic = EXACT) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Transpose", ["volume"], ["dhw"], perm=list(_TO_MODEL)),
        helper.make_node("ReduceMin", ["dhw"], ["low"], keepdims=0),
        helper.make_node("Sub", ["dhw", "low"], ["shifted"]),
        helper.make_node("ReduceMax", ["shifted"], ["peak"], keepdims=0),
        helper.make_node("Div", ["shifted", "peak"], ["standardized"]),
        helper.make_node("ReduceSum", ["volume"], ["total"], keepdims=0),  # NaN if any voxel is (ORT's min skips it)
    ]
    out = _resample(nodes, "standardized", a)
    nodes.append(helper.make_node("Identity", [out], ["image"]))
    inputs = [helper.make_tensor_value_info("volume", TensorProto.FLOAT, ["x", "y", "z"])]
    for axis in range(3):
        inputs += _axis_inputs(axis, 3, a)
    outputs = [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n0", "n1", "n2"]),
        helper.make_tensor_value_info("peak", TensorProto.FLOAT, []),
        helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
    ]
    return small_model(nodes, "ldseg_to_model_grid", inputs, outputs)


def class_step_graph(a: Arithmetic = EXACT) -> onnx.ModelProto:
    """One class (D, H, W) resampled to the input grid (n0, n1, n2) and folded into the running best
    value and class index: where it is strictly greater, it and `klass` replace them."""
    nodes: list[onnx.NodeProto] = []
    out = _resample(nodes, "values", a)
    nodes += [
        helper.make_node("Greater", [out, "best"], ["wins"]),
        helper.make_node("Where", ["wins", out, "best"], ["best_out"]),
        helper.make_node("Where", ["wins", "klass", "index"], ["index_out"]),
    ]
    grid = ["n0", "n1", "n2"]
    inputs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["d", "h", "w"])]
    for axis in range(3):
        inputs += _axis_inputs(axis, 3, a)
    inputs += [
        helper.make_tensor_value_info("best", TensorProto.FLOAT, grid),
        helper.make_tensor_value_info("index", _PROTO[a.klass_dtype], grid),
        helper.make_tensor_value_info("klass", _PROTO[a.klass_dtype], []),
    ]
    outputs = [
        helper.make_tensor_value_info("best_out", TensorProto.FLOAT, grid),
        helper.make_tensor_value_info("index_out", _PROTO[a.klass_dtype], grid),
    ]
    if a.labels_output:
        nodes.append(helper.make_node("Cast", ["index_out"], ["labels"], to=TensorProto.UINT8))
        outputs.append(helper.make_tensor_value_info("labels", TensorProto.UINT8, grid))
    return small_model(nodes, "ldseg_class_step_on_input_grid", inputs, outputs)


def map_graph(a: Arithmetic = EXACT) -> onnx.ModelProto:
    """One float map (D, H, W) -> float32 (X, Y, Z) on the input grid."""
    nodes: list[onnx.NodeProto] = []
    out = _resample(nodes, "values", a)
    nodes.append(helper.make_node("Transpose", [out], ["result"], perm=list(_TO_MODEL)))
    inputs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["d", "h", "w"])]
    for axis in range(3):
        inputs += _axis_inputs(axis, 3, a)
    result = helper.make_tensor_value_info("result", TensorProto.FLOAT, ["n2", "n1", "n0"])
    return small_model(nodes, "ldseg_map_on_input_grid", inputs, [result])


# What an engine set calls them (ldseg/runtime/artifacts/engines.py: "volume_ops").
GRAPHS: dict[str, Callable[[Arithmetic], onnx.ModelProto]] = {
    "volume_to_model_grid": to_model_grid_graph,
    "volume_class_step": class_step_graph,
    "volume_map": map_graph,
}


def graph_io(model: onnx.ModelProto) -> tuple[list[tuple[str, tuple[int | str, ...], str]], ...]:
    """(inputs, outputs) as (name, shape with named dynamic axes, numpy dtype name)."""

    def of(values: list[onnx.ValueInfoProto]) -> list[tuple[str, tuple[int | str, ...], str]]:
        out = []
        for v in values:
            tensor = v.type.tensor_type
            shape = tuple(d.dim_param or int(d.dim_value) for d in tensor.shape.dim)
            out.append((v.name, shape, str(np.dtype(_NUMPY[tensor.elem_type]))))
        return out

    return of(list(model.graph.input)), of(list(model.graph.output))
