"""K samples kept on the device as small ONNX graphs (ldseg/runtime/samples.py), for the ONNX
Runtime backend: what the torch backend does with torch ops, bit for bit the host's arithmetic.

- accumulate: one sample's probabilities (C, *grid) added to the running float32 sum (the additions
  `HostSamples.add` makes, in its order; the first sample is added to zero, which leaves it as it
  is), and its labels (ArgMax over classes, first class on ties as np.argmax) as uint8 votes;
- mean: the sum divided by K in float32 (numpy divides in float64 and rounds once: the same bits,
  float64 having more than 2 x 24 + 2 bits);
- class_max: the mean probability of the chosen class (ReduceMax over classes: the value at the
  argmax);
- entropy: the K votes' entropy, as `vote_entropy`: per class the vote count (exact integer sums),
  its -p log p looked up in `entropy_terms` (numpy's own values, so no device logarithm enters), the
  classes added one by one in float32 in numpy's order, then divided by log(C) in float64.

Built with onnx.helper like volume_graphs.py (no weights, the same for every model); the class
count is a graph constant (entropy unrolls its classes), every spatial axis is symbolic.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ldseg.runtime.volume_graphs import small_model

_GRID = ["d", "h", "w"]


def accumulate_graph() -> onnx.ModelProto:
    """(total, probabilities) -> (total + probabilities, argmax labels as uint8). `total` broadcasts:
    the first sample is added to a (1, 1, 1, 1) zero, so no zero volume is ever uploaded."""
    volume = ["c", *_GRID]
    nodes = [
        helper.make_node("Add", ["total", "probabilities"], ["total_out"]),
        helper.make_node("ArgMax", ["probabilities"], ["argmax"], axis=0, keepdims=0, select_last_index=0),
        helper.make_node("Cast", ["argmax"], ["labels"], to=TensorProto.UINT8),
    ]
    return small_model(
        nodes,
        "ldseg_accumulate",
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["tc", "td", "th", "tw"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, volume),
        ],
        [
            helper.make_tensor_value_info("total_out", TensorProto.FLOAT, volume),
            helper.make_tensor_value_info("labels", TensorProto.UINT8, _GRID),
        ],
    )


def mean_graph() -> onnx.ModelProto:
    """(total, count) -> total / count in float32."""
    volume = ["c", *_GRID]
    return small_model(
        [helper.make_node("Div", ["total", "count"], ["mean"])],
        "ldseg_mean",
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, volume),
            helper.make_tensor_value_info("count", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, volume)],
    )


def class_max_graph() -> onnx.ModelProto:
    """mean (C, *grid) -> its maximum over the classes (*grid)."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    return small_model(
        [
            helper.make_node("Constant", [], ["axes"], value=axes),
            helper.make_node("ReduceMax", ["mean", "axes"], ["confidence"], keepdims=0),
        ],
        "ldseg_class_max",
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["c", *_GRID])],
        [helper.make_tensor_value_info("confidence", TensorProto.FLOAT, _GRID)],
    )


def entropy_graph(num_classes: int) -> onnx.ModelProto:
    """(votes (K, *grid) uint8, terms (K + 1,) float32, log_classes float64 scalar) -> entropy (*grid)."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    nodes = [
        helper.make_node("Constant", [], ["axes"], value=axes),
        helper.make_node("Cast", ["votes"], ["votes32"], to=TensorProto.INT32),  # Equal has no uint8 kernel on CUDA
    ]
    total = ""
    for c in range(num_classes):
        klass = helper.make_tensor(f"class{c}", TensorProto.INT32, [], [c])
        nodes += [
            helper.make_node("Constant", [], [f"class{c}"], value=klass),
            helper.make_node("Equal", ["votes32", f"class{c}"], [f"is{c}"]),
            helper.make_node("Cast", [f"is{c}"], [f"one{c}"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", [f"one{c}", "axes"], [f"count{c}"], keepdims=0),
            helper.make_node("Gather", ["terms", f"count{c}"], [f"term{c}"], axis=0),
        ]
        if c == 0:
            total = "term0"
        else:
            nodes.append(helper.make_node("Add", [total, f"term{c}"], [f"sum{c}"]))
            total = f"sum{c}"
    nodes += [
        helper.make_node("Cast", [total], ["sum64"], to=TensorProto.DOUBLE),
        helper.make_node("Div", ["sum64", "log_classes"], ["entropy64"]),
        helper.make_node("Cast", ["entropy64"], ["entropy"], to=TensorProto.FLOAT),
    ]
    return small_model(
        nodes,
        "ldseg_entropy",
        [
            helper.make_tensor_value_info("votes", TensorProto.UINT8, ["k", *_GRID]),
            helper.make_tensor_value_info("terms", TensorProto.FLOAT, ["k1"]),
            helper.make_tensor_value_info("log_classes", TensorProto.DOUBLE, []),
        ],
        [helper.make_tensor_value_info("entropy", TensorProto.FLOAT, _GRID)],
    )
