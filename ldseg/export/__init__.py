"""Export: checkpoint -> ONNX bundle (graphs + manifest), validation against PyTorch, inspection.

specs.py says what each graph is, onnx_export.py how one graph is exported and checked, fp16.py
lowers a checked FP32 graph to FP16, manifest.py records everything, exporter.py assembles the
bundle folder atomically; validate.py and inspect.py read a finished bundle.

The public functions are imported lazily (PEP 562): light submodules such as build_options
import without paying for torch.onnx/onnxscript.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldseg.export.exporter import export_bundle
    from ldseg.export.inspect import inspect_bundle
    from ldseg.export.validate import ValidationReport, validate_bundle

__all__ = ["ValidationReport", "export_bundle", "inspect_bundle", "validate_bundle"]
_HOME = {
    "export_bundle": "ldseg.export.exporter",
    "inspect_bundle": "ldseg.export.inspect",
    "validate_bundle": "ldseg.export.validate",
    "ValidationReport": "ldseg.export.validate",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
