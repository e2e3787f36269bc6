"""Graphs a bundle derives from other graphs instead of tracing the model again.

Tracing is most of an export's time (torch.export, then its decomposition pass, per graph), and two
of the five graphs repeat another one: `decoder_argmax` is the decoder plus one ArgMax, and
`denoise_step` is the denoiser plus the sampler update. So each network is traced once:
- decoder_argmax = decoder, then ArgMax over the classes (first index on ties, as torch.argmax) and a
  Cast to uint8;
- denoise_step = t taken from the coefficient row (Gather of column 0), the denoiser graph, then the
  update graph (the traced `sampler_step`: a*z + b*eps + c*noise, renormalized per sample).
Both are built from the finished base graph, FP16-lowered or not, so they are what the base graph
computes, node for node; the additions stay FP32 as in the traced versions. Internal names get a
prefix so the parts cannot collide; the node metadata (module scopes) is kept.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ldseg.export.specs import GraphSpec


def _prefixed(graph: onnx.GraphProto, prefix: str) -> onnx.GraphProto:
    """Every internal name prefixed; graph inputs and outputs keep theirs (they are the joints)."""
    return onnx.compose.add_prefix_graph(graph, prefix, rename_inputs=False, rename_outputs=False)


def _model(graph: onnx.GraphProto, base: onnx.ModelProto, *others: onnx.ModelProto) -> onnx.ModelProto:
    """A model around `graph` with the base's IR version and metadata, and every part's opsets."""
    opsets: dict[str, int] = {}
    for part in (base, *others):
        for entry in part.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    imports = [helper.make_opsetid(domain, version) for domain, version in opsets.items()]
    model = helper.make_model(graph, opset_imports=imports, ir_version=base.ir_version)
    model.metadata_props.extend(base.metadata_props)
    return model


def _values(graphs: list[onnx.GraphProto], names: list[str], kind: str) -> list[onnx.ValueInfoProto]:
    found = {v.name: v for g in graphs for v in getattr(g, kind)}
    return [found[name] for name in names]


def argmax_graph(decoder: onnx.ModelProto, spec: GraphSpec) -> onnx.ModelProto:
    """decoder_argmax from the decoder: probabilities -> ArgMax(axis=1) -> uint8 labels."""
    (probabilities,) = (o.name for o in decoder.graph.output)
    (labels,) = spec.output_names
    graph = _prefixed(decoder.graph, "decoder/")
    graph.name = spec.name
    graph.node.extend(
        [
            helper.make_node("ArgMax", [probabilities], ["labels_int64"], axis=1, keepdims=0, name="labels/argmax"),
            helper.make_node("Cast", ["labels_int64"], [labels], to=TensorProto.UINT8, name="labels/cast"),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(labels, TensorProto.UINT8, list(spec.outputs[0].shape)))
    return _model(graph, decoder)


def step_graph(denoiser: onnx.ModelProto, update: onnx.ModelProto, spec: GraphSpec) -> onnx.ModelProto:
    """denoise_step from the denoiser (z, z_image, t -> eps) and the update (z, eps, coeffs, noise -> z_next)."""
    den = _prefixed(denoiser.graph, "denoiser/")
    upd = _prefixed(update.graph, "update/")
    (eps,) = (o.name for o in den.output)
    if [i.name for i in den.input] != ["z", "z_image", "t"] or [i.name for i in upd.input] != [
        "z",
        eps,
        "coeffs",
        "noise",
    ]:
        raise ValueError(f"cannot join {[i.name for i in den.input]} and {[i.name for i in upd.input]} into a step")
    column = helper.make_tensor("step/t_column", TensorProto.INT64, [], [0])
    take_t = helper.make_node("Gather", ["coeffs", column.name], ["t"], axis=1, name="step/t")
    graph = helper.make_graph(
        [take_t, *den.node, *upd.node],
        spec.name,
        inputs=_values([den, upd], spec.input_names, "input"),
        outputs=list(upd.output),
        initializer=[column, *den.initializer, *upd.initializer],
    )
    return _model(graph, denoiser, update)
