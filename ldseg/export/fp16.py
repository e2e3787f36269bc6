"""FP32 -> FP16 graph pass: FP16 weights and activations, FP32 islands, FP32 graph I/O.

Route chosen: export once in FP32 (the graph that validation trusts), then lower it with this pass,
instead of exporting a half-precision PyTorch model: PyTorch on CPU has no FP16 kernels for some 3D
ops, casting by hand inside the model would touch model code, and onnxconverter-common is not a
dependency. The pass is driven by the metadata the dynamo exporter stores on every node
(`pkg.torch.onnx.class_hierarchy`, the module classes the node came from), so "keep GroupNorm in
FP32" is a rule about modules, not a pattern match on the decomposed mean/var ops.

A node runs in FP16 iff its hierarchy contains one of the graph's `fp16_body` classes (see
specs.py), none of KEEP_FP32_MODULES, and its op is not in KEEP_FP32_OPS. Hence FP32 stays:
- normalizations (GroupNorm's mean/var reductions, LayerNorm, BatchNorm): FP16 overflows there
  (../shared/docs/tensorrt.md, TensorRT #2564/#4111);
- the time embedding: sin/cos of t * freq with t up to 999, where FP16's spacing is 0.5 rad;
- softmax, and whatever the wrapper adds around the body: the encoder's min-max of raw
  intensities, the sampler update with its per-sample renormalization, the argmax;
- attention blocks with a head dimension below MIN_FP16_HEAD_DIM (`fp32_scopes`): their logits
  are products of unnormalized scalars with no 1/sqrt(d) shrink, so FP16 rounding of q, k and the
  logits moves the softmax. Measured on glas2d's final 1-channel attention: the image latent was
  off by 1.5 % of its range in FP16, 0.33 % with that block in FP32 (the 8-head blocks, head
  dimension 8, do not matter).
Casts are inserted where a value crosses between the two; an FP32 initializer read only by FP16
nodes is stored as FP16 (clipped to the FP16 range). Graph inputs and outputs stay FP32
(keep_io_types), so a runtime binds the same buffers for either precision.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ldseg.export.onnx_export import check_and_infer
from ldseg.model.components import ElementLayerNorm
from ldseg.model.layers import BatchNorm, GroupNorm, SelfAttention, TimeEmbedding

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"
SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # module paths, relative to the exported root module
MIN_FP16_HEAD_DIM = 4
KEEP_FP32_MODULES: tuple[type[nn.Module], ...] = (GroupNorm, BatchNorm, ElementLayerNorm, TimeEmbedding)
KEEP_FP32_OPS = frozenset(
    {
        "Softmax", "LogSoftmax", "BatchNormalization", "LayerNormalization", "InstanceNormalization",
        "GroupNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sin", "Cos",
    }
)  # fmt: skip
# Float inputs that are parameters of the op, not data: they keep their type (Resize's roi/scales
# are FP32-only), and inputs of type-agnostic ops (Shape) need no cast.
_PARAM_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),
    "Shape": frozenset({0}),
    "Size": frozenset({0}),
}
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Fp16Stats:
    fp16_nodes: int
    fp32_nodes: int  # nodes computing on floats that stayed FP32
    casts: int


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _metadata_list(node: onnx.NodeProto, key: str) -> list[str] | None:
    for prop in node.metadata_props:
        if prop.key == key:
            return [str(v) for v in ast.literal_eval(prop.value)]
    return None


def _hierarchy(node: onnx.NodeProto) -> list[str] | None:
    return _metadata_list(node, HIERARCHY_KEY)


def fp32_scopes(root: nn.Module) -> tuple[str, ...]:
    """Module paths (as the exporter names scopes) of attention blocks too narrow for FP16."""
    return tuple(
        name
        for name, module in root.named_modules()
        if isinstance(module, SelfAttention) and module.query.in_features // module.heads < MIN_FP16_HEAD_DIM
    )


def node_in_fp16(node: onnx.NodeProto, body: set[str], keep: set[str], keep_scopes: tuple[str, ...] = ()) -> bool:
    if node.op_type in KEEP_FP32_OPS:
        return False
    classes = set(_hierarchy(node) or ())
    scopes = _metadata_list(node, SCOPES_KEY) or []
    in_kept_scope = any(s == k or s.startswith(k + ".") for s in scopes for k in keep_scopes)
    return bool(classes & body) and not classes & keep and not in_kept_scope


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _data_inputs(node: onnx.NodeProto, types: dict[str, int]) -> list[int]:
    """Positions of the node's FP32 data inputs (the ones whose type follows the node's precision)."""
    skip = _PARAM_INPUTS.get(node.op_type, frozenset())
    return [i for i, name in enumerate(node.input) if name and i not in skip and types.get(name) == FLOAT]


def _to_fp16_tensor(tensor: TensorProto, name: str) -> TensorProto:
    array = np.clip(numpy_helper.to_array(tensor), -_FP16_MAX, _FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(array, name)


def _retype_attribute(node: onnx.NodeProto) -> bool:
    """Make a Cast/Constant/ConstantOfShape that produces FP32 produce FP16 instead."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16
            return True
        if node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(_to_fp16_tensor(attr.t, attr.t.name))
            return True
    return False


def convert_to_fp16(
    model: onnx.ModelProto, body: Iterable[type[nn.Module]], keep_scopes: tuple[str, ...] = ()
) -> tuple[onnx.ModelProto, Fp16Stats]:
    """Lower an exported FP32 graph to mixed FP16/FP32 as described above; `keep_scopes` are module
    paths kept FP32 in addition to the rules (see `fp32_scopes`). Returns a new model."""
    # Typed copy: the pass needs the element type of every value, not only of the graph's I/O.
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError("FP16 pass: graphs with subgraphs (If/Loop/Scan) are not supported")
    if not any(_hierarchy(n) is not None for n in graph.node):
        raise ValueError(
            "FP16 pass needs the dynamo exporter's node metadata; this graph has none (TorchScript export?)"
        )
    types = _elem_types(graph)
    body_names, keep_names = {_qualname(c) for c in body}, {_qualname(c) for c in KEEP_FP32_MODULES}
    # Indexed by position: protobuf hands out a fresh wrapper object on every access.
    want = [FLOAT16 if node_in_fp16(n, body_names, keep_names, keep_scopes) else FLOAT for n in graph.node]

    # FP32 initializers: convert in place when every reader is FP16, otherwise add an FP16 copy.
    readers: dict[str, set[int]] = defaultdict(set)
    for k, node in enumerate(graph.node):
        for i in _data_inputs(node, types):
            readers[node.input[i]].add(want[k])
    current = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    converted: dict[tuple[str, int], str] = {}  # (value, dtype) -> name holding it in that dtype
    for index, init in enumerate(graph.initializer):
        if init.data_type != FLOAT or FLOAT16 not in readers.get(init.name, ()):
            current[init.name] = init.data_type
        elif readers[init.name] == {FLOAT16}:
            graph.initializer[index].CopyFrom(_to_fp16_tensor(init, init.name))
            current[init.name] = FLOAT16
        else:
            copy = _to_fp16_tensor(init, f"{init.name}__fp16")
            graph.initializer.append(copy)
            current[init.name] = FLOAT
            converted[(init.name, FLOAT16)] = copy.name

    nodes: list[onnx.NodeProto] = []
    casts = fp16_nodes = fp32_nodes = 0
    # Work on detached copies: the graph's node list is rebuilt from `nodes` at the end.
    for k, node in enumerate([onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]):
        target = want[k]
        positions = _data_inputs(node, types)
        for i in positions:
            name = node.input[i]
            if current.get(name, FLOAT) == target:
                continue
            if (name, target) not in converted:
                cast_name = f"{name}__to_{'fp16' if target == FLOAT16 else 'fp32'}"
                nodes.append(helper.make_node("Cast", [name], [cast_name], to=target, name=f"{cast_name}_cast"))
                converted[(name, target)] = cast_name
                casts += 1
            node.input[i] = converted[(name, target)]
        retyped = target == FLOAT16 and _retype_attribute(node)
        produces = target if positions or retyped else FLOAT
        for out in node.output:
            if types.get(out) == FLOAT:
                current[out] = produces
        if positions or retyped:
            fp16_nodes += produces == FLOAT16
            fp32_nodes += produces == FLOAT
        nodes.append(node)

    # keep_io_types: an output computed in FP16 gets a final Cast back to FP32 under its own name.
    for output in graph.output:
        if types.get(output.name) == FLOAT and current.get(output.name) == FLOAT16:
            inner = f"{output.name}__fp16"
            for node in nodes:
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if i == output.name else i for i in node.input]
            nodes.append(helper.make_node("Cast", [inner], [output.name], to=FLOAT, name=f"{output.name}_cast"))
            casts += 1
    del graph.node[:]
    graph.node.extend(nodes)
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "ldseg.precision": "fp16"})
    return check_and_infer(model), Fp16Stats(fp16_nodes, fp32_nodes, casts)
