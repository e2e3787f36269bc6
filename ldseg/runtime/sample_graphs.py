"""K samples kept on the device as small ONNX graphs (ldseg/runtime/samples.py), for the ONNX
Runtime backend and as TensorRT's sample engines: what the torch backend does with torch ops, bit
for bit the host's arithmetic (TensorRT's entropy aside, below).

- accumulate: one sample's probabilities (C, *grid) added to the running float32 sum (the additions
  `HostSamples.add` makes, in its order; the first sample is added to zero, which leaves it as it
  is), and its labels (first class of the largest probability, as np.argmax) as uint8 votes;
- mean: the sum divided by K in float32 (numpy divides in float64 and rounds once: the same bits,
  float64 having more than 2 x 24 + 2 bits);
- class_max: the mean probability of the chosen class (ReduceMax over classes: the value at the
  argmax);
- entropy: the K votes' entropy, as `vote_entropy`: per class the vote count (exact integer sums),
  its -p log p looked up in `entropy_terms` (numpy's own values, so no device logarithm enters), the
  classes added one by one in float32 in numpy's order, then divided by log(C) in float64 (ONNX
  Runtime) or, TensorRT having no float64, in float32 (`exact=False`).

Built with onnx.helper like volume_graphs.py (no weights, the same for every model); the class
count is a graph constant (accumulate and entropy unroll their classes), every other axis is
symbolic (TensorRT's profiles fix them to the model grid: build_options.sample_profiles).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import TensorProto, helper

from ldseg.runtime.volume_graphs import small_model

_GRID = ["d", "h", "w"]


def accumulate_graph(num_classes: int) -> onnx.ModelProto:
    """(total, probabilities) -> (total + probabilities, their labels as uint8). `total` broadcasts:
    ONNX Runtime adds the first sample to a (1, 1, 1, 1) zero, so no zero volume is ever uploaded
    (TensorRT's engine takes the whole sum, zeroed on the device). The labels are the first class of
    the largest probability, as np.argmax, by the class step's rule (strictly greater replaces),
    unrolled over the classes: ArgMax on a GPU (cuDNN's reduction, TensorRT's TopK) does not say
    which of exactly tied classes it returns."""
    volume = ["c", *_GRID]
    zero = helper.make_tensor("class0", TensorProto.INT32, [], [0])
    nodes = [helper.make_node("Constant", [], ["class0"], value=zero)]
    for c in range(num_classes):
        at = helper.make_tensor(f"at{c}", TensorProto.INT64, [], [c])
        nodes += [
            helper.make_node("Constant", [], [f"at{c}"], value=at),
            helper.make_node("Gather", ["probabilities", f"at{c}"], [f"p{c}"], axis=0),
        ]
    if num_classes == 1:  # every vote is class 0, at the grid's shape
        nodes += [
            helper.make_node("Greater", ["p0", "p0"], ["never"]),
            helper.make_node("Where", ["never", "class0", "class0"], ["index0"]),
        ]
    best, index = "p0", "index0" if num_classes == 1 else "class0"
    for c in range(1, num_classes):
        klass = helper.make_tensor(f"class{c}", TensorProto.INT32, [], [c])
        nodes += [
            helper.make_node("Constant", [], [f"class{c}"], value=klass),
            helper.make_node("Greater", [f"p{c}", best], [f"wins{c}"]),
            helper.make_node("Where", [f"wins{c}", f"p{c}", best], [f"best{c}"]),
            helper.make_node("Where", [f"wins{c}", f"class{c}", index], [f"index{c}"]),
        ]
        best, index = f"best{c}", f"index{c}"
    nodes += [
        helper.make_node("Add", ["total", "probabilities"], ["total_out"]),
        helper.make_node("Cast", [index], ["labels"], to=TensorProto.UINT8),
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


def entropy_graph(num_classes: int, *, exact: bool = True) -> onnx.ModelProto:
    """(votes (K, *grid) uint8, terms (K + 1,) float32, log_classes scalar) -> entropy (*grid).
    exact: the last division in float64, as numpy's (ONNX Runtime); otherwise in float32 by
    log(C) rounded to float32 (TensorRT has no float64): within an ulp or two of the host's."""
    count, divisor = (TensorProto.INT64, TensorProto.DOUBLE) if exact else (TensorProto.INT32, TensorProto.FLOAT)
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
            helper.make_node("Cast", [f"is{c}"], [f"one{c}"], to=count),
            helper.make_node("ReduceSum", [f"one{c}", "axes"], [f"count{c}"], keepdims=0),
            helper.make_node("Gather", ["terms", f"count{c}"], [f"term{c}"], axis=0),
        ]
        if c == 0:
            total = "term0"
        else:
            nodes.append(helper.make_node("Add", [total, f"term{c}"], [f"sum{c}"]))
            total = f"sum{c}"
    if exact:
        nodes += [
            helper.make_node("Cast", [total], ["sum64"], to=TensorProto.DOUBLE),
            helper.make_node("Div", ["sum64", "log_classes"], ["entropy64"]),
            helper.make_node("Cast", ["entropy64"], ["entropy"], to=TensorProto.FLOAT),
        ]
    else:
        nodes.append(helper.make_node("Div", [total, "log_classes"], ["entropy"]))
    return small_model(
        nodes,
        "ldseg_entropy",
        [
            helper.make_tensor_value_info("votes", TensorProto.UINT8, ["k", *_GRID]),
            helper.make_tensor_value_info("terms", TensorProto.FLOAT, ["k1"]),
            helper.make_tensor_value_info("log_classes", divisor, []),
        ],
        [helper.make_tensor_value_info("entropy", TensorProto.FLOAT, _GRID)],
    )


# TensorRT's sample engines (engines.json "volume_ops"; float32, the class count built in): name -> graph.
SAMPLE_GRAPHS: dict[str, Callable[[int], onnx.ModelProto]] = {
    "sample_accumulate": accumulate_graph,
    "sample_mean": lambda num_classes: mean_graph(),
    "sample_class_max": lambda num_classes: class_max_graph(),
    "sample_entropy": lambda num_classes: entropy_graph(num_classes, exact=False),
}
