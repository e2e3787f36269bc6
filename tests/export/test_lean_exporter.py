"""ldseg/export/lean_exporter.py: the exporter without its idle passes writes the graphs of its full
path, takes the shortcuts on these networks, and takes the full path on anything else."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.onnx._internal.exporter import _fx_passes, _registration

from ldseg.export import lean_exporter, onnx_export
from ldseg.export.specs import BATCH_AXIS, GraphSpec, TensorSpec, graph_specs, update_spec
from ldseg.model.layers import folded_batchnorm, phase_upsampling
from ldseg.model.network import LDSeg


def canonical(proto: onnx.ModelProto) -> list[str]:
    """The graph without value names: each node's op, attributes and inputs (graph inputs by name,
    initializers by content, other values by the node and output that made them). Two spellings
    with one meaning are written as one: Reshape's allowzero with a constant shape without zeros,
    and Slice's steps input when it is all ones."""
    graph = proto.graph
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    ids = {v.name: f"input {v.name}" for v in graph.input}
    for name, array in constants.items():
        ids[name] = f"{array.dtype}{list(array.shape)} {hashlib.sha1(array.tobytes()).hexdigest()[:12]}"
    lines = []
    for k, node in enumerate(graph.node):
        inputs = list(node.input)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Reshape" and inputs[1] in constants and (constants[inputs[1]] != 0).all():
            attrs.pop("allowzero", None)
        steps = constants.get(inputs[4]) if node.op_type == "Slice" and len(inputs) == 5 else None
        if steps is not None and (steps == 1).all():
            inputs = inputs[:4]
        lines.append(f"{node.op_type} {sorted(attrs.items())} {[ids.get(i, i) for i in inputs]}")
        for j, out in enumerate(node.output):
            ids[out] = f"node {k}.{j}"
    lines.append(f"outputs {[ids[o.name] for o in graph.output]}")
    return lines


def _trace(spec: GraphSpec, model: LDSeg, folder: Path) -> onnx.ModelProto:
    proto, exporter, _ = onnx_export.trace_graph(spec, model, folder / spec.file, opset=18, batch=1)
    assert exporter == "dynamo"
    return proto


@pytest.fixture()
def full_path_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the exporter's own decomposition and type promotion passes (as the lean exporter
    finds them when it falls back to them)."""
    calls = {"decompose": 0, "promote": 0}

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            calls[name] += 1
            return original(*args)

        return wrapper

    monkeypatch.setattr(_fx_passes, "decompose_with_registry", counted("decompose", _fx_passes.decompose_with_registry))
    monkeypatch.setattr(
        _fx_passes, "insert_type_promotion_nodes", counted("promote", _fx_passes.insert_type_promotion_nodes)
    )
    return calls


# The encoder computes booleans and indices (its min-max), so type promotion still runs there.
@pytest.mark.parametrize(("name", "promotions"), [("encoder", 1), ("denoiser", 0), ("decoder", 0), ("update", 0)])
def test_the_lean_path_writes_the_graphs_of_the_full_path_and_skips_the_idle_passes(
    demo_model: LDSeg,
    name: str,
    promotions: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    full_path_calls: dict[str, int],
) -> None:
    spec = update_spec(demo_model.cfg) if name == "update" else graph_specs(demo_model.cfg)[name]
    with phase_upsampling(demo_model), folded_batchnorm(demo_model):
        lean = _trace(spec, demo_model, tmp_path)
        assert full_path_calls == {"decompose": 0, "promote": promotions}  # what the lean path skipped
        monkeypatch.setattr(onnx_export, "lean_exporter", contextlib.nullcontext)
        full = _trace(spec, demo_model, tmp_path)
    assert full_path_calls == {"decompose": 1, "promote": promotions + 1}
    assert len(lean.graph.node) == len(full.graph.node)
    assert canonical(lean) == canonical(full)


class _HalfPrecisionInside(torch.nn.Module):
    """A graph the shortcuts must not take: an op torchlib has no translation for as it is
    (`Tensor.to`, which the decomposition lowers) and a float16 tensor (type promotion's work)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float16) * 3).to(torch.float32) + x


def test_other_programs_take_the_full_path(demo_model: LDSeg, tmp_path: Path, full_path_calls: dict[str, int]) -> None:
    spec = GraphSpec(
        "probe",
        build=lambda _model: _HalfPrecisionInside(),
        inputs=(TensorSpec("x", (BATCH_AXIS, 4), "float32"),),
        outputs=(TensorSpec("y", (BATCH_AXIS, 4), "float32"),),
        example_inputs=lambda _cfg, n, gen: (torch.rand((n, 4), generator=gen),),
        fp16_body=(),
    )
    proto, exporter, _ = onnx_export.trace_graph(spec, demo_model, tmp_path / "probe.onnx", opset=18, batch=1)
    assert exporter == "dynamo"
    assert full_path_calls == {"decompose": 1, "promote": 1}
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _HalfPrecisionInside()(torch.from_numpy(x)).numpy(), rtol=1e-3)


def test_the_registry_is_built_once_per_opset_and_restored_after() -> None:
    original = vars(_registration.ONNXRegistry)["from_torchlib"]
    with lean_exporter.lean_exporter():
        first = _registration.ONNXRegistry().from_torchlib(opset_version=18)
        assert _registration.ONNXRegistry.from_torchlib(opset_version=18) is first
        assert _registration.ONNXRegistry.from_torchlib(opset_version=20) is not first
    assert vars(_registration.ONNXRegistry)["from_torchlib"] is original
    assert _registration.ONNXRegistry.from_torchlib(opset_version=18) is not first
