"""The manifest.json an export writes (schema and reader: ldseg/runtime/artifacts/bundle.py).

Everything a runtime needs to use the graphs without the checkpoint: the full model config, each
graph's signature and how it was made, the diffusion settings with the sampler coefficient table,
library versions, the source checkpoint's hash, and the SHA-256 of every file in the bundle.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from ldseg.runtime.backends.onnxruntime.probe import onnxruntime_needed

with onnxruntime_needed("writing a bundle manifest"):
    import onnxruntime
import onnxscript
import torch

from ldseg.export.specs import GraphSpec, TensorSpec
from ldseg.model.diffusion import sampler_table
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import BUNDLE_FORMAT, FAILED, MANIFEST, PASSED, REWRITES, sha256_file
from ldseg.versions import LDSEG_VERSION


def _tensor(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}


def graph_entry(
    spec: GraphSpec, *, exporter: str, fallback_reason: str | None, precision: str, **extra: Any
) -> dict[str, Any]:
    return {
        "file": spec.file,
        "inputs": [_tensor(t) for t in spec.inputs],
        "outputs": [_tensor(t) for t in spec.outputs],
        "exporter": exporter,
        "fallback_reason": fallback_reason,
        "precision": precision,
        **extra,
    }


def versions() -> dict[str, str]:
    return {
        "ldseg": LDSEG_VERSION,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def build_manifest(
    model: LDSeg,
    graphs: Mapping[str, dict[str, Any]],
    *,
    folder: Path,
    precision: str,
    opset: int,
    batch: int,
) -> dict[str, Any]:
    cfg = model.cfg
    table = sampler_table(cfg.diffusion)
    files: Sequence[str] = sorted(g["file"] for g in graphs.values())
    return {
        "format": BUNDLE_FORMAT,
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "precision": precision,
        "opset": opset,
        "batch": batch,
        "io": {"batch_axis": "batch", "spatial": "static", "io_dtype": "float32"},
        "shapes": {
            "image": list(cfg.image_shape),
            "latent": list(cfg.latent_shape),
            "labels": list(cfg.image_size),
            "num_classes": cfg.num_classes,
        },
        "graphs": dict(graphs),
        "rewrites": list(REWRITES),  # see ldseg.model.rewrites and layers
        "diffusion": {
            **dataclasses.asdict(cfg.diffusion),
            "table_columns": ["t", "a", "b", "c"],
            "table": table.rows.tolist(),
        },
        "versions": versions(),
        "checkpoint_hash": model.checkpoint_hash,
        "trained": dict(model.trained),
        "files": {name: sha256_file(folder / name) for name in files},
    }


def with_validation(manifest: Mapping[str, Any], validation: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest plus the record of its validation: `verdict` ("passed" or "failed"), who
    judged it and by which tolerance, and the numbers (ldseg.runtime.artifacts.bundle reads the verdict)."""
    if validation.get("verdict") not in (PASSED, FAILED):
        raise ValueError(f"validation verdict must be {PASSED!r} or {FAILED!r}, got {validation.get('verdict')!r}")
    return {**manifest, "validation": dict(validation)}


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path
