"""ONNX Runtime's volume operations (ldseg/runtime/volume_ops.py): pre- and post-processing as three
small ONNX graphs run by the backend's own execution provider, so a runtime-only GPU install does
them on the GPU without PyTorch.

The graphs are built here with onnx.helper, not exported into each bundle: they hold no weights and
are the same for every model, so code is their one definition (tests/runtime/backends/
test_onnxruntime_volume.py holds them to the CPU path). Each is separable linear interpolation at
scipy.ndimage.zoom's own coordinates, i * (in - 1) / (out - 1) per axis (ldseg.io.preprocess.
zoom_coordinates): the host computes, per axis, the two source indices and the weight of every
output index (a few hundred numbers), and the graph gathers and blends along each axis in float64,
scipy's arithmetic, rounding to float32 once at the end. ONNX `Resize` is not used: ONNX Runtime's
CPU Resize has no float64 kernel, and in float32 it moved the knee's model-grid image by up to
1.6e-6 from scipy's.
- to_model_grid: volume (X, Y, Z) float32 -> min-max in float32 as the official code -> (D, H, W);
  also returns the peak and the sum, so a constant or NaN volume is refused in the CPU path's words
  (ONNX Runtime's ReduceMin skips NaN where numpy's min returns it);
- labels: probabilities (C, D, H, W) -> (C, *input D, H, W) -> ArgMax over C (first class on ties,
  as np.argmax) -> uint8 (X, Y, Z);
- map: one float map (D, H, W) -> float32 (X, Y, Z).
Inputs and outputs are host arrays (session.run copies them to and from the device); the volume goes
up as float32 (an int16 scan converts exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import onnx
from onnx import TensorProto, helper

from ldseg.io.preprocess import zoom_coordinates
from ldseg.runtime.backends.onnxruntime.probe import onnxruntime_needed

with onnxruntime_needed("the onnxruntime backend"):
    import onnxruntime as ort

OPSET = 18
_CONSTANT = "cannot min-max standardize a constant (or NaN) image"  # ldseg.io.preprocess's words
_TO_MODEL = (2, 1, 0)


def _axis_inputs(axis: int, rank: int) -> list[onnx.ValueInfoProto]:
    shape: list[int | str | None] = [1] * rank
    shape[axis] = f"n{axis}"
    return [
        helper.make_tensor_value_info(f"i0_{axis}", TensorProto.INT64, [f"n{axis}"]),
        helper.make_tensor_value_info(f"i1_{axis}", TensorProto.INT64, [f"n{axis}"]),
        helper.make_tensor_value_info(f"w_{axis}", TensorProto.DOUBLE, shape),
    ]


def _blend(nodes: list[onnx.NodeProto], x: str, axis: int) -> str:
    """x resampled along `axis`: x[i0] + (x[i1] - x[i0]) * w, in x's type (float64)."""
    p = f"a{axis}_"
    nodes += [
        helper.make_node("Gather", [x, f"i0_{axis}"], [p + "low"], axis=axis),
        helper.make_node("Gather", [x, f"i1_{axis}"], [p + "high"], axis=axis),
        helper.make_node("Sub", [p + "high", p + "low"], [p + "step"]),
        helper.make_node("Mul", [p + "step", f"w_{axis}"], [p + "part"]),
        helper.make_node("Add", [p + "low", p + "part"], [p + "out"]),
    ]
    return p + "out"


def _resample(nodes: list[onnx.NodeProto], x: str, first_axis: int) -> str:
    """x (float32) -> float64, blended along the three spatial axes from `first_axis` on, -> float32."""
    nodes.append(helper.make_node("Cast", [x], ["x64"], to=TensorProto.DOUBLE))
    out = "x64"
    for axis in range(first_axis, first_axis + 3):
        out = _blend(nodes, out, axis)
    nodes.append(helper.make_node("Cast", [out], ["resampled"], to=TensorProto.FLOAT))
    return "resampled"


def _model(nodes: list[onnx.NodeProto], name: str, inputs: list, outputs: list) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(nodes, name, inputs, outputs), opset_imports=[helper.make_opsetid("", OPSET)]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def to_model_grid_graph() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Transpose", ["volume"], ["dhw"], perm=list(_TO_MODEL)),
        helper.make_node("ReduceMin", ["dhw"], ["low"], keepdims=0),
        helper.make_node("Sub", ["dhw", "low"], ["shifted"]),
        helper.make_node("ReduceMax", ["shifted"], ["peak"], keepdims=0),
        helper.make_node("Div", ["shifted", "peak"], ["standardized"]),
        helper.make_node("ReduceSum", ["volume"], ["total"], keepdims=0),  # NaN if any voxel is (ORT's min skips it)
    ]
    out = _resample(nodes, "standardized", 0)
    nodes.append(helper.make_node("Identity", [out], ["image"]))
    inputs = [helper.make_tensor_value_info("volume", TensorProto.FLOAT, ["x", "y", "z"])]
    for axis in range(3):
        inputs += _axis_inputs(axis, 3)
    outputs = [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n0", "n1", "n2"]),
        helper.make_tensor_value_info("peak", TensorProto.FLOAT, []),
        helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
    ]
    return _model(nodes, "ldseg_to_model_grid", inputs, outputs)


def to_input_grid_graph(labels: bool) -> onnx.ModelProto:
    """labels: (C, D, H, W) probabilities -> uint8 (X, Y, Z); else one map (D, H, W) -> float32 (X, Y, Z)."""
    nodes: list[onnx.NodeProto] = []
    if labels:
        out = _resample(nodes, "values", 1)
        nodes += [
            helper.make_node("ArgMax", [out], ["best"], axis=0, keepdims=0, select_last_index=0),
            helper.make_node("Cast", ["best"], ["best_u8"], to=TensorProto.UINT8),
            helper.make_node("Transpose", ["best_u8"], ["result"], perm=list(_TO_MODEL)),
        ]
        values = helper.make_tensor_value_info("values", TensorProto.FLOAT, ["c", "d", "h", "w"])
        result = helper.make_tensor_value_info("result", TensorProto.UINT8, ["n2", "n1", "n0"])
        inputs = [values]
        for axis in range(1, 4):
            inputs += _axis_inputs(axis, 4)
    else:
        out = _resample(nodes, "values", 0)
        nodes.append(helper.make_node("Transpose", [out], ["result"], perm=list(_TO_MODEL)))
        values = helper.make_tensor_value_info("values", TensorProto.FLOAT, ["d", "h", "w"])
        result = helper.make_tensor_value_info("result", TensorProto.FLOAT, ["n2", "n1", "n0"])
        inputs = [values]
        for axis in range(3):
            inputs += _axis_inputs(axis, 3)
    return _model(nodes, "ldseg_labels_on_input_grid" if labels else "ldseg_map_on_input_grid", inputs, [result])


def axis_feeds(sizes_in: Sequence[int], sizes_out: Sequence[int], first_axis: int, rank: int) -> dict[str, np.ndarray]:
    """Per spatial axis: the two source indices and the weight of every output index (zoom's own)."""
    feeds: dict[str, np.ndarray] = {}
    for k, (n_in, n_out) in enumerate(zip(sizes_in, sizes_out)):
        axis = first_axis + k
        x = zoom_coordinates(int(n_in), int(n_out))
        low = np.minimum(np.floor(x).astype(np.int64), n_in - 1)
        shape = [1] * rank
        shape[axis] = int(n_out)
        feeds[f"i0_{axis}"] = low
        feeds[f"i1_{axis}"] = np.minimum(low + 1, n_in - 1)
        feeds[f"w_{axis}"] = (x - low).reshape(shape)
    return feeds


class OrtVolumeOps:
    """The three graphs in sessions on `providers` (the backend's), made on first use."""

    def __init__(self, providers: list[tuple[str, dict[str, str]]], where: str):
        self.providers = providers
        self.where = where

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=self.providers)

    @cached_property
    def _pre(self) -> ort.InferenceSession:
        return self._session(to_model_grid_graph())

    @cached_property
    def _labels(self) -> ort.InferenceSession:
        return self._session(to_input_grid_graph(labels=True))

    @cached_property
    def _map(self) -> ort.InferenceSession:
        return self._session(to_input_grid_graph(labels=False))

    def to_model_grid(self, array_nib: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        target = tuple(int(s) for s in grid)
        if array_nib.ndim != 3 or len(target) != 3:
            raise ValueError(f"to_model_grid: need a 3D array and 3D grid, got {array_nib.shape} and {target}")
        volume = np.ascontiguousarray(array_nib, dtype=np.float32)
        feeds = {"volume": volume, **axis_feeds(volume.shape[::-1], target, 0, 3)}
        image, peak, total = self._pre.run(None, feeds)
        if not (float(peak) > 0 and np.isfinite(total)):
            raise ValueError(_CONSTANT)
        return np.asarray(image, dtype=np.float32)

    def labels_on_input_grid(self, probabilities: np.ndarray, input_shape_nib: Sequence[int]) -> np.ndarray:
        if probabilities.ndim != 4 or len(input_shape_nib) != 3:
            raise ValueError(
                f"need probs (C, D, H, W) and a 3D input shape, got {probabilities.shape}, {tuple(input_shape_nib)}"
            )
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        feeds = {"values": np.ascontiguousarray(probabilities, dtype=np.float32)}
        feeds.update(axis_feeds(probabilities.shape[1:], target, 1, 4))
        return np.asarray(self._labels.run(None, feeds)[0])

    def map_on_input_grid(self, values: np.ndarray, input_shape_nib: Sequence[int]) -> np.ndarray:
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        feeds = {"values": np.ascontiguousarray(values, dtype=np.float32), **axis_feeds(values.shape, target, 0, 3)}
        return np.asarray(self._map.run(None, feeds)[0])
