"""`inspect_bundle`: what a bundle holds, as rich renderables (manifest, graphs, ops, parameters).

Hashes are checked and shown per file rather than raised, so a damaged bundle can still be looked at.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from ldseg.runtime.artifacts.bundle import Bundle, TensorInfo, load_bundle, sha256_file

_TOP_OPS = 8


def _signature(tensors: tuple[TensorInfo, ...]) -> str:
    # escape: "[batch, 4]" would otherwise be read as rich markup
    return escape("\n".join(f"{t.name} {t.dtype}[{', '.join(str(d) for d in t.shape)}]" for t in tensors))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def graph_stats(path: Path) -> tuple[Counter[str], int, dict[str, int]]:
    """Op counts, parameter count, and parameter bytes per dtype of one ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    params, nbytes = 0, Counter[str]()
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        params += count
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        nbytes[str(dtype)] += count * dtype.itemsize
    return ops, params, dict(nbytes)


def _verdict(bundle: Bundle) -> str:
    record = bundle.validation or {}
    verdict = record.get("verdict", "none recorded")
    return f"{verdict}: {record.get('summary', 'loaders refuse it without --trust-unvalidated')}"


def _summary(bundle: Bundle) -> Table:
    cfg = bundle.config
    table = Table(title=f"bundle {bundle.path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    untrained = [k for k, v in bundle.trained.items() if not v]
    rows = [
        ("format", bundle.format),
        ("preset", f"{cfg.preset} ({cfg.spatial_dims}D, {cfg.num_classes} classes)"),
        ("image / latent", f"{cfg.image_shape} / {cfg.latent_shape}"),
        ("precision", f"{bundle.precision} (graph I/O float32)"),
        ("opset", str(bundle.opset)),
        ("batch", f"dynamic (exported for {bundle.batch})"),
        ("sampler", f"{bundle.sampler}, {bundle.steps} steps, {cfg.diffusion.schedule} schedule"),
        ("checkpoint", bundle.checkpoint_hash or "(in-memory model)"),
        ("untrained components", ", ".join(untrained) or "none"),
        ("validation", _verdict(bundle)),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(bundle.versions.items()))),
    ]
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def _graphs(bundle: Bundle) -> Table:
    table = Table(title="graphs")
    for column in ("graph", "inputs", "outputs", "exporter", "ops (top)", "parameters", "file", "sha-256"):
        table.add_column(column)
    for name, info in bundle.graphs.items():
        path = bundle.path / info.file
        if not path.is_file():
            table.add_row(
                name,
                _signature(info.inputs),
                _signature(info.outputs),
                info.exporter,
                "",
                "",
                info.file,
                "[red]missing[/red]",
            )
            continue
        ok = sha256_file(path) == bundle.files.get(info.file)
        try:
            ops, params, nbytes = graph_stats(path)
        except DecodeError:
            ops, params, nbytes = Counter(), 0, {}
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(_TOP_OPS)) or "[red]unreadable ONNX[/red]"
        sizes = ", ".join(f"{_size(b)} {dt}" for dt, b in sorted(nbytes.items()))
        table.add_row(
            name,
            _signature(info.inputs),
            _signature(info.outputs),
            escape(info.exporter + (f" ({info.fallback_reason})" if info.fallback_reason else "")),
            f"{sum(ops.values())} nodes: {top}",
            f"{params:,} ({sizes})",
            f"{info.file} ({_size(path.stat().st_size)})",
            "[green]ok[/green]" if ok else "[bold red]MISMATCH[/bold red]",
        )
    return table


def inspect_bundle(bundle_dir: Path | str) -> Group:
    """Manifest summary and one row per graph; print with rich's Console.print."""
    bundle = load_bundle(bundle_dir, verify=False, trust_unvalidated=True)  # show it, whatever it is
    return Group(_summary(bundle), _graphs(bundle))
