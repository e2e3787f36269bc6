"""How one graph is exported: the dynamo exporter, TorchScript only as an announced fallback.

Every graph is checked after export: its signature against the spec (names, dtypes, static dims,
the batch axis named "batch"), `onnx.checker` with full checking, and strict shape inference, whose
result (value_info for every tensor) is what gets saved.

Simplification: onnxscript's optimizer (constant folding, dead-code removal, reshape shapes
materialized; the demo denoiser goes from 1696 to 565 nodes) with the rewrite rules that fire on
these networks (ldseg.export.optimize: the full rule set took half of a knee export's time for 3 %
fewer nodes, all of which the kept rules remove too). Measured on glas2d, onnxslim removes ~12% more
nodes (Mul/Add/Transpose chains) without changing ONNX Runtime CPU latency (step 10.8 vs 9.8 ms,
decoder 504 vs 480 ms, encoder 478 vs 481 ms), because ORT and TensorRT fuse the same patterns at
load. It would add a dependency and another rewrite to validate, and it drops the per-node metadata
the FP16 pass reads. onnx-simplifier also needs ORT for folding and lags new opsets. So the bundle
ships what the exporter wrote, checked.

Graphs that repeat another one (decoder_argmax, denoise_step) are not traced: ldseg.export.compose
builds them from the traced graph, and `derive_graph` checks them like any other.

The exporter runs inside ldseg.export.lean_exporter, which skips work that changes nothing on
these networks (a decomposition re-trace, type promotion on all-float32 graphs, a registry rebuilt
per graph): more than half of the tracing time.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from ldseg.errors import ArtifactError
from ldseg.export import compose
from ldseg.export.lean_exporter import lean_exporter
from ldseg.export.optimize import optimize
from ldseg.export.specs import BATCH_AXIS, GraphSpec, TensorSpec
from ldseg.model.network import LDSeg

MIN_OPSET = 18  # the dynamo exporter's floor; also the first opset with ReduceMean axes as input
_NP_TO_ONNX = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "uint8": onnx.TensorProto.UINT8}


@dataclass(frozen=True)
class ExportedGraph:
    name: str
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    fallback_reason: str | None = None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs progress and third-party notices (e.g. torchvision ops it skips) that are
    noise for a CLI user; real failures still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export_dynamo(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], spec: GraphSpec, opset: int
) -> onnx.ModelProto:
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=4096)
    # Keyed by the forward()'s parameter names, which the spec's input names follow.
    dynamic = {name: {0: batch} for name in spec.input_names}
    with _quiet_exporter(), lean_exporter():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic,
            external_data=False,
            optimize=False,  # ldseg.export.optimize instead: the same clean-up without the slow rules
            verbose=False,
        )
    assert program is not None
    optimize(program.model)
    return program.model_proto


def _export_torchscript(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], spec: GraphSpec, opset: int, path: Path
) -> onnx.ModelProto:
    axes = {name: {0: BATCH_AXIS} for name in spec.input_names + spec.output_names}
    with _quiet_exporter():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=axes,
        )
    return onnx.load(str(path))


def _fix_signature(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """Name the batch axis "batch" everywhere and refuse a graph whose signature is not the spec's."""
    for values, tensors, kind in (
        (proto.graph.input, spec.inputs, "input"),
        (proto.graph.output, spec.outputs, "output"),
    ):
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            raise ArtifactError(f"{spec.name}: exported {kind}s {names}, expected {[t.name for t in tensors]}")
        for value, tensor in zip(values, tensors):
            _check_value(spec.name, value, tensor)


def _check_value(graph: str, value: onnx.ValueInfoProto, tensor: TensorSpec) -> None:
    ttype = value.type.tensor_type
    if ttype.elem_type != _NP_TO_ONNX[tensor.dtype]:
        got = onnx.TensorProto.DataType.Name(ttype.elem_type)
        raise ArtifactError(f"{graph}: {value.name} exported as {got}, expected {tensor.dtype}")
    dims = ttype.shape.dim
    if len(dims) != len(tensor.shape):
        raise ArtifactError(f"{graph}: {value.name} has rank {len(dims)}, expected {len(tensor.shape)}")
    for axis, (dim, want) in enumerate(zip(dims, tensor.shape)):
        if want == BATCH_AXIS:
            if dim.HasField("dim_value"):
                raise ArtifactError(
                    f"{graph}: {value.name} axis 0 was specialized to {dim.dim_value}; batch must stay dynamic"
                )
            dim.dim_param = BATCH_AXIS
        elif dim.dim_value != want:
            raise ArtifactError(
                f"{graph}: {value.name} axis {axis} is {dim.dim_param or dim.dim_value}, expected {want}"
            )


def check_and_infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Full onnx.checker pass, then strict shape inference (types checked, every value typed)."""
    del proto.graph.value_info[:]  # re-derived below; stale entries would contradict a rewritten graph
    onnx.checker.check_model(proto, full_check=True)
    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)


def export_graph(spec: GraphSpec, model: LDSeg, path: Path, *, opset: int, batch: int) -> ExportedGraph:
    """Export `spec` of `model` (eval mode) to `path` and check it. Returns which exporter was used."""
    proto, exporter, reason = trace_graph(spec, model, path, opset=opset, batch=batch)
    onnx.save(proto, str(path))
    return ExportedGraph(spec.name, path, exporter, reason)


def trace_graph(
    spec: GraphSpec, model: LDSeg, scratch: Path, *, opset: int, batch: int
) -> tuple[onnx.ModelProto, str, str | None]:
    """Trace `spec` of `model` (eval mode) to a checked ONNX model: (model, exporter, fallback reason).
    `scratch` is where the TorchScript fallback may write its file."""
    module = spec.build(model).eval()
    # Trace with at least 2 samples: a size-1 example would let torch.export specialize the batch.
    gen = torch.Generator().manual_seed(0)
    args = spec.example_inputs(model.cfg, max(batch, 2), gen)
    exporter, reason = "dynamo", None
    try:
        proto = _export_dynamo(module, args, spec, opset)
    except Exception as exc:  # noqa: BLE001 - any exporter failure triggers the documented fallback
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        warnings.warn(
            f"dynamo export of {spec.name} failed ({reason}); falling back to the TorchScript exporter",
            RuntimeWarning,
            stacklevel=2,
        )
        exporter = "torchscript"
        proto = _export_torchscript(module, args, spec, opset, scratch)
    _fix_signature(proto, spec)
    proto.doc_string = f"ldseg {spec.name} graph ({exporter} exporter)"
    return check_and_infer(proto), exporter, reason


def derive_graph(spec: GraphSpec, base: onnx.ModelProto, update: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """`spec` (a graph with `derived_from`) built from its base graph's finished model, checked as if
    it had been traced: signature against the spec, onnx.checker, strict shape inference."""
    if spec.derived_from == "decoder":
        proto = compose.argmax_graph(base, spec)
    elif spec.derived_from == "denoiser" and update is not None:
        proto = compose.step_graph(base, update, spec)
    else:
        raise ValueError(f"{spec.name}: no rule to derive it from {spec.derived_from!r}")
    _fix_signature(proto, spec)
    proto.doc_string = f"ldseg {spec.name} graph (derived from {spec.derived_from})"
    return check_and_infer(proto)
