"""`export_bundle`: checkpoint -> bundle folder (ONNX graphs + manifest.json), written atomically.

The bundle is assembled in a hidden temp folder beside the target and renamed into place only once
every graph has been exported, checked, (optionally) lowered to FP16, hashed and validated against
the model: a reader never sees a half-written bundle, and a failed export or validation leaves
nothing behind (unless asked to keep a failed bundle, whose manifest then says it failed).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from ldseg.errors import ArtifactError
from ldseg.export.fp16 import convert_to_fp16, fp32_scopes
from ldseg.export.manifest import build_manifest, graph_entry, with_validation, write_manifest
from ldseg.export.onnx_export import MIN_OPSET, derive_graph, trace_graph
from ldseg.export.specs import GraphSpec, graph_specs, update_spec
from ldseg.io.atomic import check_folder_target, staged_folder
from ldseg.model.checkpoint import load_checkpoint
from ldseg.model.network import LDSeg
from ldseg.model.rewrites import lean_form
from ldseg.runtime.artifacts.bundle import EXPORT_PRECISIONS, GRAPH_NAMES, MANIFEST

if TYPE_CHECKING:
    from ldseg.export.validate import ValidationReport

Progress = Callable[[str], None]


def _check_options(opset: int, precision: str, batch: int, graphs: Sequence[str]) -> None:
    highest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= highest:
        raise ValueError(f"opset {opset} not supported: choose {MIN_OPSET}..{highest}")
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(
            f"precision {precision!r} not supported: choose {' or '.join(EXPORT_PRECISIONS)} "
            "(int8 comes from calibration)"
        )
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    unknown = [g for g in graphs if g not in GRAPH_NAMES]
    if unknown or not graphs:
        raise ValueError(f"unknown graphs {unknown}; choose among {', '.join(GRAPH_NAMES)}")


def export_bundle(
    checkpoint_path_or_model: Path | str | LDSeg,
    out_dir: Path | str,
    *,
    opset: int = 18,
    precision: str = "fp32",
    batch: int = 1,
    overwrite: bool = False,
    graphs: Sequence[str] = GRAPH_NAMES,
    progress: Progress | None = None,
    validate: bool = True,
    keep_failed: bool = False,
    on_validated: Callable[[ValidationReport], None] | None = None,
) -> Path:
    """Export a checkpoint (or an in-memory LDSeg, set to eval mode) as a bundle folder.

    `batch` is the batch the graphs are exported for and recorded as the optimization hint; the
    batch axis stays dynamic. `graphs` exports a subset (a runtime needs encoder, denoise_step and
    decoder_argmax; decoder for probabilities). With `validate` (the default) the staged bundle is
    compared with the model (ldseg.export.validate) before it is moved into place, `on_validated`
    gets the report, and the manifest records it; a bundle that fails is not written (ArtifactError)
    unless `keep_failed`. Without `validate` the manifest records no verdict, and loaders refuse the
    bundle unless told to trust it. Raises OutputError if `out_dir` exists without `overwrite` or
    cannot be written, ValueError for unsupported options.
    """
    graphs = tuple(graphs)
    _check_options(opset, precision, batch, graphs)
    target = Path(out_dir)
    check_folder_target(target, overwrite, MANIFEST)  # fail before minutes of exporting
    say = progress or (lambda _msg: None)
    model = checkpoint_path_or_model
    if not isinstance(model, LDSeg):
        say(f"loading checkpoint {model}")
        model = load_checkpoint(model)
    model.eval()
    specs = [spec for name, spec in graph_specs(model.cfg).items() if name in graphs]

    # The model's lean form (ldseg.model.rewrites; the checkpoint's weights are restored on exit):
    # phase-form upsampling (8/27 of the decoder's full-resolution multiply-adds), inference BatchNorm
    # folded into the conv before it, and each attention block's q, k, v as one matrix (4 nodes fewer
    # per block in the launch-bound step).
    with staged_folder(target, overwrite=overwrite, marker=MANIFEST) as tmp:
        with lean_form(model):
            entries = _export_graphs(specs, model, tmp, opset, precision, batch, say)
        manifest = build_manifest(model, entries, folder=tmp, precision=precision, opset=opset, batch=batch)
        write_manifest(tmp, manifest)
        if validate:
            from ldseg.export.validate import validate_bundle

            say(f"validating {len(specs)} graph(s) and the pipeline against PyTorch (ONNX Runtime CPU)")
            pipeline = {"encoder", "denoise_step", "decoder_argmax"} <= set(graphs)  # what a runtime needs
            report = dataclasses.replace(validate_bundle(tmp, model, pipeline=pipeline), bundle=target)
            if on_validated is not None:
                on_validated(report)
            record = report.record()
            write_manifest(tmp, with_validation(manifest, record))
            if not report.passed and not keep_failed:
                why = record["summary"]
                raise ArtifactError(f"{target}: not written: the bundle {why} (--keep-failed writes it anyway)")
    say(f"wrote {target}")
    return target


def _export_graphs(
    specs: list[GraphSpec], model: LDSeg, folder: Path, opset: int, precision: str, batch: int, say: Progress
) -> dict[str, dict[str, Any]]:
    """Trace each network once (inside the rewrites), lower it to FP16 if asked, derive the graphs
    that repeat another (ldseg.export.compose) from the finished base graph; manifest entries in
    `specs` order. A base graph that was not asked for is traced but not written."""
    all_specs = graph_specs(model.cfg)
    bases = list(dict.fromkeys(spec.derived_from or spec.name for spec in specs))
    done: dict[str, tuple[onnx.ModelProto, dict[str, Any]]] = {}
    update = None
    with tempfile.TemporaryDirectory() as scratch:  # the TorchScript fallback writes a file
        for name in bases:
            done[name] = _trace_one(all_specs[name], model, Path(scratch), opset, precision, batch, say)
        if any(spec.derived_from == "denoiser" for spec in specs):
            step_update = update_spec(model.cfg)
            update, _, _ = trace_graph(step_update, model, Path(scratch) / step_update.file, opset=opset, batch=batch)
    entries: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.derived_from is None:
            proto, entry = done[spec.name]
        else:
            say(f"deriving {spec.name} from {spec.derived_from}")
            base, base_entry = done[spec.derived_from]
            proto = derive_graph(spec, base, update)
            entry = graph_entry(
                spec,
                exporter=base_entry["exporter"],
                fallback_reason=base_entry["fallback_reason"],
                precision=precision,
                derived_from=spec.derived_from,
                **{k: v for k, v in base_entry.items() if k.startswith("fp") or k == "casts"},
            )
        onnx.save(proto, str(folder / spec.file))
        entries[spec.name] = entry
    return entries


def _trace_one(
    spec: GraphSpec, model: LDSeg, scratch: Path, opset: int, precision: str, batch: int, say: Progress
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Trace one graph, lower it to FP16 if asked: the finished model and its manifest entry."""
    say(f"exporting {spec.name} (opset {opset}, {precision})")
    proto, exporter, reason = trace_graph(spec, model, scratch / spec.file, opset=opset, batch=batch)
    if exporter != "dynamo":
        say(f"{spec.name}: dynamo export failed ({reason}); used the TorchScript exporter")
    extra: dict[str, Any] = {}
    if precision == "fp16":
        keep = fp32_scopes(spec.build(model))
        proto, stats = convert_to_fp16(proto, spec.fp16_body, keep)
        extra = {
            "fp16_nodes": stats.fp16_nodes,
            "fp32_nodes": stats.fp32_nodes,
            "casts": stats.casts,
            "fp32_scopes": list(keep),
        }
    return proto, graph_entry(spec, exporter=exporter, fallback_reason=reason, precision=precision, **extra)
