"""Streaming min/max calibration: activation ranges with memory bounded by one inference.

ORT's calibrators keep what each `collect_data` call produced and, fed the knee3d graphs with the
volumes concatenated into one batch (ORT session without graph optimizations, memory arena on),
the calibration of the knee encoder ran out of 24 GB. Here each graph gets one augmented copy whose
extra outputs are a ReduceMin and a ReduceMax per calibrated tensor (scalars), run on one sample
(batch 1) at a time with the CPU memory arena off, so the peak is that of one ordinary inference,
whatever the number of volumes; the running min/max is folded in after every run. The tensors are
the ones ORT's own MinMax calibrator would pick (inputs and outputs of the quantizable op types),
and the result is a `TensorsData` that `quantize_static` takes as its calibration cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
_SUFFIX = ("/ldseg_min", "/ldseg_max")


def tensors_to_calibrate(model: onnx.ModelProto, op_types: Sequence[str]) -> list[str]:
    """Float, non-initializer inputs and outputs of every node of `op_types`, in graph order
    (ORT's `CalibraterBase.select_tensors_to_calibrate` rule). `model` must carry value_info."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    weights = {i.name for i in g.initializer}
    seen: dict[str, None] = {}
    for node in g.node:
        if node.op_type in op_types:
            for name in [*node.input, *node.output]:
                if name and name not in weights and types.get(name) in _FLOATS:
                    seen.setdefault(name)
    return list(seen)


def augment(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` with a scalar ReduceMin and ReduceMax output per tensor (keepdims 0),
    each placed right after the node that produces the tensor: in graph order they run as soon
    as it exists, so no activation is kept alive for its statistics (appended at the end, every
    calibrated tensor would stay allocated until the last node)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    wanted = set(tensors)

    def reductions(names: Sequence[str]) -> list[onnx.NodeProto]:
        return [
            helper.make_node(op, [name], [name + suffix], keepdims=0, name=name + suffix)
            for name in names
            if name in wanted
            for op, suffix in zip(("ReduceMin", "ReduceMax"), _SUFFIX)
        ]

    nodes = reductions([i.name for i in g.input])
    for node in g.node:
        nodes += [node, *reductions(list(node.output))]
    del g.node[:]
    g.node.extend(nodes)
    for name in tensors:
        for suffix in _SUFFIX:
            g.output.append(helper.make_tensor_value_info(name + suffix, TensorProto.FLOAT, []))
    return out


class RangeTracker:
    """One graph's augmented session; `run(feed)` returns the graph's own outputs and folds the
    feed's per-tensor min/max into the running ranges."""

    def __init__(self, model_path: Path, op_types: Sequence[str], *, threads: int | None = None):
        model = onnx.load(str(model_path))
        self.tensors = tensors_to_calibrate(model, op_types)
        self.outputs = [o.name for o in model.graph.output]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False  # freed activations go back: the peak is one inference
        if threads:
            options.intra_op_num_threads = threads
        augmented = augment(model, self.tensors).SerializeToString()
        self.session = ort.InferenceSession(augmented, options, providers=["CPUExecutionProvider"])
        self.low = np.full(len(self.tensors), np.inf)
        self.high = np.full(len(self.tensors), -np.inf)
        self.samples = 0

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.session.run(None, feed)
        n = len(self.outputs)
        stats = np.asarray(results[n:], dtype=np.float64).reshape(-1, 2)
        self.low = np.fmin(self.low, stats[:, 0])  # fmin/fmax: a NaN in one run does not poison the range
        self.high = np.fmax(self.high, stats[:, 1])
        self.samples += 1
        return list(results[:n])

    def tensors_data(self, *, symmetric: bool = True) -> TensorsData:
        """The ranges as ORT's MinMax calibrator reports them (symmetric: -max|x|, +max|x|)."""
        if self.samples == 0:
            raise ValueError("no calibration data was run")
        data = {}
        for name, low, high in zip(self.tensors, self.low, self.high):
            if symmetric:
                bound = max(abs(low), abs(high))
                low, high = -bound, bound
            data[name] = TensorData(lowest=np.float32(low), highest=np.float32(high))
        return TensorsData(CalibrationMethod.MinMax, data)

    def save(self, path: Path, *, symmetric: bool = True) -> Path:
        save_tensors_data(self.tensors_data(symmetric=symmetric), path)
        return path
