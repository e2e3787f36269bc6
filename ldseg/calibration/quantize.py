"""One graph -> a Q/DQ INT8 graph that TensorRT builds as written (strongly typed, explicit quantization).

Recipe (onnxruntime.quantization):
1. `quant_pre_process` (ORT's basic graph optimizations + ONNX shape inference; its symbolic shape
   inference gives up on these graphs, so it is skipped). If pre-processing fails, the raw graph is
   quantized and the report says so.
2. Choose the nodes to quantize — the spatial compute, where INT8 pays off:
   - every Conv and ConvTranspose;
   - MatMul/Gemm whose second input is a weight (an initializer) applied per position (activation
     rank >= 3): the attention q/k/v/output projections.
   Everything else stays FP32: normalizations (GroupNorm is exported decomposed into
   ReduceMean/Sub/Pow/Sqrt/Reciprocal/Mul and its renormalization, BatchNorm, LayerNorm), Softmax,
   the activation x activation MatMuls of attention (scores, weights x values: tiny at latent
   resolution, and the softmax output is a poor fit for symmetric INT8), the time embedding and the
   per-block time projections (rank-2 Gemms on (B, C): negligible compute, t-sensitive), the
   encoder's min-max, the sampler update and renormalization, the argmax.
3. `quantize_static`, QDQ format, S8S8 symmetric (activation_type = weight_type = QInt8,
   ActivationSymmetric/WeightSymmetric: TensorRT rejects non-zero zero points), per-channel
   weights (Conv axis 0, ConvTranspose axis 1, MatMul axis 1 = output features), bias left FP32
   (TensorRT fuses a float bias; it has no INT32 Q/DQ), no output quantization (Q/DQ sit on the
   inputs of the quantized ops, where TensorRT fuses them). Activation ranges: "minmax" (default;
   exact over the calibration data), "percentile" (99.999th percentile of |x|, 2048 bins), or
   "entropy" (KL-optimal threshold, 2048-bin histograms as TensorRT's legacy calibrator; ORT's
   search is pure Python, about 1 s per calibrated tensor, a few minutes per graph).
4. Dedicate every activation Q/DQ pair to its quantized consumers: ORT feeds a quantized tensor's
   *other* consumers (a GroupNorm's reshape, a swish, a skip concat) from the DequantizeLinear too,
   which would put Q/DQ in front of normalizations. Those consumers are rewired to the FP32 tensor.
5. The result is checked (onnx.checker, strict shape inference) and must keep the graph's I/O
   names and types (FP32 in and out, like every bundle).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from ldseg.runtime.backends.onnxruntime.probe import onnxruntime_needed

with onnxruntime_needed("INT8 calibration"):
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, create_calibrator, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

from ldseg.calibration.data import Feed, FeedReader
from ldseg.calibration.ranges import RangeTracker
from ldseg.errors import ArtifactError
from ldseg.export.onnx_export import check_and_infer

QUANTIZED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"


@dataclass(frozen=True)
class KeptNode:
    node: str
    op: str
    reason: str


@dataclass
class QuantizedGraph:
    name: str
    preprocessed: bool
    preprocess_note: str | None
    quantized: dict[str, int]  # op type -> nodes quantized
    kept_compute: list[KeptNode]  # Conv/ConvTranspose/MatMul/Gemm left FP32, with the reason
    fp32_ops: dict[str, int]  # op type -> float nodes left FP32 (normalizations, Softmax, ...)
    fp32_nodes: list[str] = field(default_factory=list)  # names of every node left in FP32
    rewired: int = 0  # non-quantized consumers moved off a DequantizeLinear (step 4)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preprocessed": self.preprocessed,
            "preprocess_note": self.preprocess_note,
            "quantized": dict(self.quantized),
            "kept_compute": [{"node": k.node, "op": k.op, "reason": k.reason} for k in self.kept_compute],
            "fp32_ops": dict(self.fp32_ops),
            "fp32_nodes": list(self.fp32_nodes),
            "rewired": self.rewired,
        }


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.value_info, *g.input, *g.output]}


def _in_time_embedding(node: onnx.NodeProto) -> bool:
    for prop in node.metadata_props:  # the dynamo exporter's module path, when it survived
        if prop.key == _HIERARCHY_KEY:
            return any(str(c).endswith(".TimeEmbedding") for c in ast.literal_eval(prop.value))
    return False


def select_nodes(model: onnx.ModelProto) -> tuple[list[str], list[KeptNode]]:
    """(names of the nodes to quantize, compute nodes deliberately left in FP32 with why)."""
    weights = {i.name for i in model.graph.initializer}
    ranks = _ranks(model)
    quantize: list[str] = []
    kept: list[KeptNode] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            quantize.append(node.name)
        elif node.op_type in ("MatMul", "Gemm"):
            if node.input[1] not in weights:
                kept.append(
                    KeptNode(node.name, node.op_type, "activation x activation (attention scores / weights x values)")
                )
            elif _in_time_embedding(node) or ranks.get(node.input[0], 0) < 3:
                kept.append(KeptNode(node.name, node.op_type, "time path (rank-2 dense on the time embedding)"))
            else:
                quantize.append(node.name)
    return quantize, kept


def _name_nodes(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def dedicate_qdq(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Rewire consumers that are not quantized ops off activation DequantizeLinear outputs, back to
    the FP32 tensor the QuantizeLinear read; drop Q/DQ nodes left without consumers. Returns the
    number of rewired inputs."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    rewired = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight's DequantizeLinear (reads an initializer)
        source = q.input[0]
        for node in graph.node:
            if node.name in quantized or node is dq:
                continue
            for k, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[k] = source
                    rewired += 1
    # Remove Q/DQ nodes nothing reads any more (graph outputs count as readers).
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in QDQ_OPS and n.output[0] not in used]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    return rewired


def qdq_pairs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Every DequantizeLinear with what it reads (weight or activation) and who reads it: for the
    placement tests and the report."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    pairs = []
    for dq in (n for n in graph.node if n.op_type == "DequantizeLinear"):
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            kind, scale_name, zp_name = "activation", q.input[1], q.input[2] if len(q.input) > 2 else ""
            source = producer.get(q.input[0])
            source_op = source.op_type if source is not None else "graph input"
        else:
            kind, scale_name, zp_name = "weight", dq.input[1], dq.input[2] if len(dq.input) > 2 else ""
            source_op = "initializer"
        scale = numpy_helper.to_array(inits[scale_name]) if scale_name in inits else None
        zero = numpy_helper.to_array(inits[zp_name]) if zp_name in inits else None
        axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
        pairs.append(
            {
                "dq": dq.name,
                "kind": kind,
                "source_op": source_op,
                "consumers": [(c.name, c.op_type) for c in consumers[dq.output[0]]],
                "scale": scale,
                "zero_point": zero,
                "axis": axis,
                "weight": dq.input[0] if kind == "weight" else None,
            }
        )
    return pairs


def _summary(model: onnx.ModelProto, quantized: set[str]) -> tuple[dict[str, int], dict[str, int], list[str]]:
    q_ops: Counter[str] = Counter()
    fp32_ops: Counter[str] = Counter()
    fp32_nodes: list[str] = []
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            continue
        if node.name in quantized:
            q_ops[node.op_type] += 1
        elif node.op_type not in (
            "Reshape",
            "Shape",
            "Constant",
            "Unsqueeze",
            "Squeeze",
            "Gather",
            "Concat",
            "Transpose",
            "Identity",
            "Slice",
            "Cast",
        ):
            fp32_ops[node.op_type] += 1  # compute nodes (data movement ops have no precision to speak of)
            fp32_nodes.append(node.name)
    return dict(sorted(q_ops.items())), dict(sorted(fp32_ops.items())), fp32_nodes


def _check_signature(source: onnx.ModelProto, result: onnx.ModelProto, name: str) -> None:
    def sig(m: onnx.ModelProto) -> list[tuple[str, int]]:
        return [(v.name, v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]]

    if sig(source) != sig(result):
        raise ArtifactError(f"{name}: quantization changed the graph signature {sig(source)} -> {sig(result)}")


# Entropy as TensorRT's legacy calibrator does it: a 2048-bin histogram, thresholds searched over
# 128-bin quantizations. ORT's defaults (128/128) leave a single candidate, the full range, which
# is min-max; quantize_static cannot change them, so entropy ranges are computed here and handed
# to quantize_static as a calibration cache.
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128


def _entropy_cache(source: Path, reader: FeedReader, folder: Path) -> Path:
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise ValueError(
            f"--method entropy needs quantize_static(calibration_cache_path=...), which onnxruntime "
            f"{onnxruntime.__version__} lacks: upgrade onnxruntime or use --method minmax / percentile"
        )
    from onnxruntime.quantization.calibrate import save_tensors_data

    calibrator = create_calibrator(
        source,
        list(QUANTIZED_OPS),
        augmented_model_path=str(folder / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"symmetric": True, "num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
    )
    for start in range(len(reader)):  # one batch per collect: histograms merge, memory stays bounded
        reader.set_range(start, start + 1)
        calibrator.collect_data(reader)
    cache = folder / "ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def _quantize(
    source: Path, target: Path, reader: FeedReader | None, nodes: list[str], method: str, cache: Path | None
) -> None:
    """quantize_static on `source`, with ranges from `cache` (a TensorsData JSON) when given,
    else from `reader` (ORT's calibrators)."""
    options: dict[str, Any] = {}
    if method == "entropy" and cache is None:
        assert reader is not None
        cache = _entropy_cache(source, reader, target.parent)
    if cache is not None:
        options = {"calibration_cache_path": str(cache)}
    quantize_static(
        str(source),
        str(target),
        None if cache is not None else reader,
        **options,
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=METHODS[method],
        op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_quantize=nodes,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
            "CalibStridedMinMax": 1,  # one batch per collect: memory bounded for every method
        },
    )


@dataclass(frozen=True)
class PreparedGraph:
    """A graph ready for calibration: pre-processed, every node named, value_info inferred."""

    name: str
    source: Path  # the bundle's graph
    path: Path  # the prepared graph (calibrate and quantize this one)
    to_quantize: list[str]
    kept: list[KeptNode]
    note: str | None  # why pre-processing was skipped, if it was


def prepare_graph(name: str, source: Path, folder: Path) -> PreparedGraph:
    """Steps 1-2 of the recipe: pre-process, name the nodes, choose the nodes to quantize."""
    pre = folder / f"{name}.pre.onnx"
    note: str | None = None
    try:
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
    except Exception as exc:  # noqa: BLE001 - any pre-processing failure: quantize the raw graph, say so
        note = f"quant_pre_process failed ({type(exc).__name__}: {str(exc)[:200]}); quantized the exported graph"
        model = onnx.load(str(source))
    _name_nodes(model)
    model = onnx.shape_inference.infer_shapes(model)
    to_quantize, kept = select_nodes(model)
    named = folder / f"{name}.named.onnx"
    onnx.save(model, str(named))
    return PreparedGraph(name, source, named, to_quantize, kept, note)


def finish_graph(
    graph: PreparedGraph, target: Path, method: str, *, reader: FeedReader | None = None, cache: Path | None = None
) -> QuantizedGraph:
    """Steps 3-5: quantize `graph` with ranges from `cache` (or calibrated on `reader`), dedicate
    the Q/DQ pairs, check, and write `target`."""
    out = graph.path.with_name(f"{graph.name}.int8.onnx")
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
        _quantize(graph.path, out, reader, graph.to_quantize, method, cache)
    result = onnx.load(str(out))
    quantized = set(graph.to_quantize)
    rewired = dedicate_qdq(result, quantized)
    result = check_and_infer(result)
    _check_signature(onnx.load(str(graph.source), load_external_data=False), result, graph.name)
    props = {p.key: p.value for p in result.metadata_props}
    onnx.helper.set_model_props(result, {**props, "ldseg.precision": "int8", "ldseg.calibration": method})
    onnx.save(result, str(target))
    q_ops, fp32_ops, fp32_nodes = _summary(result, quantized)
    return QuantizedGraph(graph.name, graph.note is None, graph.note, q_ops, graph.kept, fp32_ops, fp32_nodes, rewired)


def quantize_graph(
    name: str, source: Path, target: Path, feeds: Sequence[Feed], *, method: str = "minmax", threads: int | None = None
) -> QuantizedGraph:
    """Write the Q/DQ INT8 version of `source` to `target`, calibrated on `feeds`. "minmax" streams
    the feeds one sample at a time through a RangeTracker (ranges.py); the histogram methods hand
    them to ORT's calibrators one feed per collect."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {', '.join(METHODS)}")
    if not feeds:
        raise ValueError(f"{name}: no calibration data")
    with tempfile.TemporaryDirectory(prefix="ldseg-quant-") as tmp:
        graph = prepare_graph(name, source, Path(tmp))
        if method != "minmax":
            return finish_graph(graph, target, method, reader=FeedReader(feeds))
        tracker = RangeTracker(graph.path, QUANTIZED_OPS, threads=threads)
        for feed in feeds:
            for sample in range(len(next(iter(feed.values())))):  # batch 1 per run
                tracker.run({k: v[sample : sample + 1] for k, v in feed.items()})
        cache = tracker.save(Path(tmp) / f"{name}.ranges.json")
        return finish_graph(graph, target, method, cache=cache)
