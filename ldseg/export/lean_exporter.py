"""torch.onnx.export without the work that changes nothing on these networks.

Three passes of the dynamo exporter are skipped or shared where they provably do nothing here; on
2 Zen 1 cores they were more than half of each graph's tracing (demo denoiser 9.5 -> 4.3 s, knee3d
tracing 22 -> 11 s for the decomposition alone):

1. The decomposition re-trace. The exporter passes every program through `run_decompositions` to
   lower the ops ONNX has no translation for. The ldseg networks have none (every op is one that
   torchlib translates), so the re-trace yields the same graph. Skipped only for a program without
   nested graphs whose every call is a torchlib op or an assertion the exporter drops next.
2. Type promotion, which re-runs the whole graph on fake tensors to insert casts where an op mixes
   dtypes. A graph whose every tensor is float32 has nothing to cast (Python scalars never promote
   a float32 tensor). Skipped only then (the denoiser, decoder and step update; not the encoder,
   whose min-max computes indices and booleans).
3. The registry of torchlib translations, rebuilt by every export call (about 1 s each): built
   once per opset and process. The exporter adds to a registry only for a custom translation table,
   which ldseg never passes.

The ONNX graphs are the same nodes on the same initializers as the exporter's full path; two
attributes are spelled differently with the same meaning (Reshape allowzero=0 where the re-traced
`view` gave 1, for constant shapes without zeros; Slice without its all-ones steps input). Checked
on every graph of the demo by tests/export/test_lean_exporter.py.

These are private hooks of torch.onnx's exporter (checked on torch 2.13): where a release moves one,
nothing is patched and exports take the exporter's full path, only slower.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

_LOCK = threading.RLock()  # the hooks are module globals of torch.onnx: one export at a time patches them
_REGISTRIES: dict[tuple[Any, ...], Any] = {}

# Dropped by the exporter right after the decomposition (its remove_assertion_nodes).
_ASSERTIONS = frozenset(
    {
        torch.ops.aten._assert_tensor_metadata.default,
        torch.ops.aten._assert_async.default,
        torch.ops.aten._assert_async.msg,
        torch.ops.aten._assert_scalar.default,
        torch.ops.aten.sym_constrain_range_for_size.default,
    }
)


def translatable_as_is(program: torch.export.ExportedProgram, translated: set[Any]) -> bool:
    """No nested graphs, and every call an op torchlib translates or an assertion."""
    module = program.graph_module
    if any(isinstance(sub, torch.fx.GraphModule) for sub in module.modules() if sub is not module):
        return False
    return all(
        node.target in translated or node.target in _ASSERTIONS
        for node in program.graph.nodes
        if node.op == "call_function"
    )


def all_float32(module: torch.fx.GraphModule) -> bool:
    """Every tensor the graph uses or computes is float32 (by its fake-tensor metadata; an unused
    input, such as a BatchNorm's step counter, does not count); a node without that metadata or a
    constant outside it counts as not."""
    for node in module.graph.nodes:
        if node.op == "output" or (node.op == "placeholder" and not node.users):
            continue
        if node.op == "get_attr" or "val" not in node.meta:
            return False
        values = node.meta["val"] if isinstance(node.meta["val"], (list, tuple)) else [node.meta["val"]]
        if any(isinstance(v, torch.Tensor) and v.dtype != torch.float32 for v in values):
            return False
    return True


@contextlib.contextmanager
def lean_exporter() -> Iterator[None]:
    """Within the block, torch.onnx.export skips the idle passes and reuses its registry."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes, _registration
    except ImportError:
        yield
        return
    passes: Any = _fx_passes  # private modules: typed loosely, checked for the hooks below
    decompose_all = getattr(passes, "decompose_with_registry", None)
    promote_all = getattr(passes, "insert_type_promotion_nodes", None)
    implemented = getattr(_decomp, "get_onnx_implemented_overloads", None)
    registry_class: Any = getattr(_registration, "ONNXRegistry", None)
    descriptor = vars(registry_class).get("from_torchlib") if registry_class is not None else None
    if decompose_all is None or promote_all is None or implemented is None or not isinstance(descriptor, classmethod):
        yield
        return
    build_registry = descriptor.__get__(None, registry_class)

    def decompose(program: torch.export.ExportedProgram, registry: Any) -> torch.export.ExportedProgram:
        if translatable_as_is(program, set(implemented(registry))):
            return program
        result: torch.export.ExportedProgram = decompose_all(program, registry)
        return result

    def promote(module: torch.fx.GraphModule) -> None:
        if not all_float32(module):
            promote_all(module)

    def registry_for(*args: Any, **kwargs: Any) -> Any:
        key = (args, tuple(sorted(kwargs.items())))  # the opset, however it was passed
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build_registry(*args, **kwargs)
        return _REGISTRIES[key]

    with _LOCK:
        passes.decompose_with_registry = decompose
        passes.insert_type_promotion_nodes = promote
        registry_class.from_torchlib = staticmethod(registry_for)  # called on the class or an instance
        try:
            yield
        finally:
            passes.decompose_with_registry = decompose_all
            passes.insert_type_promotion_nodes = promote_all
            registry_class.from_torchlib = descriptor
