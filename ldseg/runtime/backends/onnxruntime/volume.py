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
- class_step: one class's probabilities (D, H, W) resampled to the input grid and folded into a
  running best value and class index there (a class replaces the best only where strictly greater:
  the first class wins ties, as np.argmax); run once per class, so the device holds one class's
  float64 resampling and two input-grid maps whatever the number of classes (all classes at once
  needed C float64 input-grid maps: 96 MB on the knee, gigabytes on a large CT with many classes).
  The best value and index stay on the device between the runs (I/O binding) and only the uint8
  labels come back;
- map: one float map (D, H, W) -> float32 (X, Y, Z).
Other inputs and outputs are host arrays (session.run copies them to and from the device); the
volume goes up as float32 (an int16 scan converts exactly).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property

import numpy as np
import onnx
from onnx import TensorProto, helper

from ldseg.io.preprocess import zoom_coordinates
from ldseg.runtime.backends.onnxruntime.probe import CUDA_PROVIDER, onnxruntime_needed
from ldseg.runtime.volume_ops import DeviceMemoryError

with onnxruntime_needed("the onnxruntime backend"):
    import onnxruntime as ort

OPSET = 18
_CONSTANT = "cannot min-max standardize a constant (or NaN) image"  # ldseg.io.preprocess's words
_TO_MODEL = (2, 1, 0)
# How ONNX Runtime words an allocation failure (BFC arena, CUDA allocator, CPU allocator).
_OUT_OF_MEMORY_WORDS = ("failed to allocate memory", "out of memory", "cudaerrormemoryallocation")


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


def class_step_graph() -> onnx.ModelProto:
    """One class (D, H, W) resampled to the input grid (n0, n1, n2) and folded into the running best
    value and class index: where it is strictly greater, it and `klass` replace them."""
    nodes: list[onnx.NodeProto] = []
    out = _resample(nodes, "values", 0)
    nodes += [
        helper.make_node("Greater", [out, "best"], ["wins"]),
        helper.make_node("Where", ["wins", out, "best"], ["best_out"]),
        helper.make_node("Where", ["wins", "klass", "index"], ["index_out"]),
    ]
    grid = ["n0", "n1", "n2"]
    inputs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["d", "h", "w"])]
    for axis in range(3):
        inputs += _axis_inputs(axis, 3)
    inputs += [
        helper.make_tensor_value_info("best", TensorProto.FLOAT, grid),
        helper.make_tensor_value_info("index", TensorProto.UINT8, grid),
        helper.make_tensor_value_info("klass", TensorProto.UINT8, []),
    ]
    outputs = [
        helper.make_tensor_value_info("best_out", TensorProto.FLOAT, grid),
        helper.make_tensor_value_info("index_out", TensorProto.UINT8, grid),
    ]
    return _model(nodes, "ldseg_class_step_on_input_grid", inputs, outputs)


def map_graph() -> onnx.ModelProto:
    """One float map (D, H, W) -> float32 (X, Y, Z) on the input grid."""
    nodes: list[onnx.NodeProto] = []
    out = _resample(nodes, "values", 0)
    nodes.append(helper.make_node("Transpose", [out], ["result"], perm=list(_TO_MODEL)))
    inputs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["d", "h", "w"])]
    for axis in range(3):
        inputs += _axis_inputs(axis, 3)
    result = helper.make_tensor_value_info("result", TensorProto.FLOAT, ["n2", "n1", "n0"])
    return _model(nodes, "ldseg_map_on_input_grid", inputs, [result])


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
        name, options = providers[0]
        # Where the class step's running best and index live between its runs.
        self._device = ("cuda", int(options.get("device_id", 0))) if name == CUDA_PROVIDER else ("cpu", 0)

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=self.providers)

    @cached_property
    def _pre(self) -> ort.InferenceSession:
        return self._session(to_model_grid_graph())

    @cached_property
    def _class_step(self) -> ort.InferenceSession:
        return self._session(class_step_graph())

    @cached_property
    def _map(self) -> ort.InferenceSession:
        return self._session(map_graph())

    def to_model_grid(self, array_nib: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        target = tuple(int(s) for s in grid)
        if array_nib.ndim != 3 or len(target) != 3:
            raise ValueError(f"to_model_grid: need a 3D array and 3D grid, got {array_nib.shape} and {target}")
        volume = np.ascontiguousarray(array_nib, dtype=np.float32)
        feeds = {"volume": volume, **axis_feeds(volume.shape[::-1], target, 0, 3)}
        with self._device_memory():
            image, peak, total = self._pre.run(None, feeds)
        if not (float(peak) > 0 and np.isfinite(total)):
            raise ValueError(_CONSTANT)
        return np.asarray(image, dtype=np.float32)

    def labels_on_input_grid(self, probabilities: np.ndarray, input_shape_nib: Sequence[int]) -> np.ndarray:
        if probabilities.ndim != 4 or len(input_shape_nib) != 3:
            raise ValueError(
                f"need probs (C, D, H, W) and a 3D input shape, got {probabilities.shape}, {tuple(input_shape_nib)}"
            )
        if probabilities.shape[0] > 256:
            raise ValueError(f"at most 256 classes fit uint8 labels, got {probabilities.shape[0]}")
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        with self._device_memory():
            labels = self._fold_classes(probabilities, target)
        return np.ascontiguousarray(labels.transpose(_TO_MODEL))

    def _fold_classes(self, probabilities: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
        """The class step over every class, on the device; the index map (n0, n1, n2) on the host."""
        device, device_id = self._device
        # Ping-pong pairs of (best, index) on the device; the first class beats -inf everywhere.
        pairs = [
            (
                ort.OrtValue.ortvalue_from_numpy(np.full(target, -np.inf, np.float32), device, device_id),
                ort.OrtValue.ortvalue_from_numpy(np.zeros(target, np.uint8), device, device_id),
            ),
            (
                ort.OrtValue.ortvalue_from_shape_and_type(target, np.float32, device, device_id),
                ort.OrtValue.ortvalue_from_shape_and_type(target, np.uint8, device, device_id),
            ),
        ]
        binding = self._class_step.io_binding()
        for name, array in axis_feeds(probabilities.shape[1:], target, 0, 3).items():
            binding.bind_cpu_input(name, array)
        for c in range(probabilities.shape[0]):
            (best, index), (best_out, index_out) = pairs[c % 2], pairs[1 - c % 2]
            binding.bind_cpu_input("values", np.ascontiguousarray(probabilities[c], dtype=np.float32))
            binding.bind_cpu_input("klass", np.array(c, np.uint8))
            binding.bind_ortvalue_input("best", best)
            binding.bind_ortvalue_input("index", index)
            binding.bind_ortvalue_output("best_out", best_out)
            binding.bind_ortvalue_output("index_out", index_out)
            self._class_step.run_with_iobinding(binding)
        # A copy: on the CPU provider numpy() is a view of the OrtValue, which dies with `pairs`.
        return np.array(pairs[probabilities.shape[0] % 2][1].numpy(), copy=True)

    def map_on_input_grid(self, values: np.ndarray, input_shape_nib: Sequence[int]) -> np.ndarray:
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        feeds = {"values": np.ascontiguousarray(values, dtype=np.float32), **axis_feeds(values.shape, target, 0, 3)}
        with self._device_memory():
            return np.asarray(self._map.run(None, feeds)[0])

    @contextmanager
    def _device_memory(self) -> Iterator[None]:
        """ONNX Runtime's allocation failures (its own words, on any provider) as DeviceMemoryError."""
        try:
            yield
        except Exception as exc:
            if not any(words in str(exc).lower() for words in _OUT_OF_MEMORY_WORDS):
                raise
            raise DeviceMemoryError.of(self.where, exc) from exc
