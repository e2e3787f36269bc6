"""`ldseg-export`: import Keras weights, export ONNX bundles, build TensorRT engines, calibrate INT8,
inspect artifacts; a thin layer over ldseg.export and ldseg.calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldseg.choices import ENGINE_PRECISIONS, EXPORT_PRECISIONS
from ldseg.cli.common import (
    CalibrationMethod,
    PresetChoice,
    VersionOption,
    console,
    entry,
    one_of,
    out,
)
from ldseg.errors import ArtifactError

export_typer = typer.Typer(add_completion=False, no_args_is_help=True, help="Import, export and inspect models.")


@export_typer.callback()
def _options(version: VersionOption = None) -> None:
    """Import, export and inspect models."""


@export_typer.command("import-keras")
def import_keras(
    preset: Annotated[PresetChoice, typer.Option(help="Architecture of the weights (knee3d or glas2d).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write (.safetensors).")],
    label_encoder: Annotated[Optional[Path], typer.Option(help="labelEncoder*.hdf5")] = None,
    label_decoder: Annotated[Optional[Path], typer.Option(help="labelDecoder*.hdf5")] = None,
    image_encoder: Annotated[Optional[Path], typer.Option(help="imageEncoder*.hdf5")] = None,
    denoiser: Annotated[Optional[Path], typer.Option(help="denoiser*.hdf5 (never released)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing checkpoint.")] = False,
) -> None:
    """Read the official Keras HDF5 weights (h5py, no TensorFlow) into an ldseg checkpoint.

    Example: ldseg-export import-keras --preset knee3d --label-encoder labelEncoder3D.hdf5
    --label-decoder labelDecoder3D.hdf5 --image-encoder imageEncoder3D.hdf5 -o knee3d.safetensors
    """
    import torch

    from ldseg.model.checkpoint import save_checkpoint
    from ldseg.model.config import get_preset
    from ldseg.model.keras_import import load_keras_weights
    from ldseg.model.network import LDSeg

    torch.manual_seed(0)  # components without a file stay randomly (but reproducibly) initialized
    model = LDSeg(get_preset(preset.value))
    files = {
        "label_encoder": label_encoder,
        "label_decoder": label_decoder,
        "image_encoder": image_encoder,
        "denoiser": denoiser,
    }
    for name, path in files.items():
        if path is None:
            console.print(f"{name}: no file given, left untrained (random)")
            continue
        if not path.is_file():
            raise ArtifactError(f"{path}: no such weight file")
        load_keras_weights(getattr(model, name), path)
        model.trained[name] = True
        console.print(f"{name}: imported {path}")
    digest = save_checkpoint(
        model.eval(),
        output,
        overwrite=overwrite,
        extra={"source": {k: str(v) for k, v in files.items() if v is not None}},
    )
    out.print(
        f"{output} (sha256 {digest[:12]}, trained: {', '.join(k for k, v in model.trained.items() if v) or 'nothing'})"
    )


@export_typer.command("onnx")
def export_onnx(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint path, or 'demo'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle folder to write.")],
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer).")] = 18,
    precision: Annotated[str, one_of(EXPORT_PRECISIONS, help="fp16 keeps normalizations, softmax in FP32.")] = "fp32",
    batch: Annotated[int, typer.Option(help="Batch the graphs are traced at (the axis stays dynamic).")] = 1,
    validate: Annotated[
        bool, typer.Option(help="Compare ONNX Runtime with PyTorch before writing; the manifest records the verdict.")
    ] = True,
    keep_failed: Annotated[bool, typer.Option(help="Write the bundle even if it fails validation.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
) -> None:
    """Write a validated, self-describing ONNX bundle. Example: ldseg-export onnx demo -o demo-bundle"""
    from ldseg.export.exporter import export_bundle
    from ldseg.model.checkpoint import load_checkpoint
    from ldseg.runtime.artifacts.source import resolve_checkpoint

    model = load_checkpoint(resolve_checkpoint(checkpoint))
    console.print(f"exporting {model.cfg.preset} ({precision}, opset {opset}) to {output}")
    try:
        bundle = export_bundle(
            model,
            output,
            opset=opset,
            precision=precision,
            batch=batch,
            overwrite=overwrite,
            progress=lambda line: console.print(line, highlight=False),
            validate=validate,
            keep_failed=keep_failed,
            on_validated=lambda report: out.print(report.table()),
        )
    except ValueError as exc:  # bad option values
        raise typer.BadParameter(str(exc)) from exc
    out.print(str(bundle), highlight=False)


@export_typer.command("build-engine")
def build_engine(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder, or with --check an engine set.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Engine set folder.")] = None,
    precision: Annotated[str, one_of(ENGINE_PRECISIONS, help="Must match the bundle's; best takes it.")] = "best",
    max_batch: Annotated[int, typer.Option("--max-batch", "--batch", help="Largest batch (K samples).")] = 1,
    opt_batch: Annotated[Optional[int], typer.Option(help="Batch to tune for (default: max).")] = None,
    workspace: Annotated[Optional[float], typer.Option("--workspace", help="Workspace limit in GB.")] = None,
    timing_cache: Annotated[Optional[Path], typer.Option(help="Persistent timing cache file.")] = None,
    dla: Annotated[Optional[int], typer.Option("--dla", help="Jetson: DLA core, with GPU fallback.")] = None,
    builder_optimization_level: Annotated[Optional[int], typer.Option(help="0-5 (TensorRT default 3).")] = None,
    include_denoiser: Annotated[bool, typer.Option(help="Also build the raw denoiser graph.")] = False,
    volume_ops: Annotated[
        bool,
        typer.Option(
            help="3D models: also build the pre/post-processing engines (resampling on the GPU; with "
            "--max-batch >= 2, K samples averaged there too)."
        ),
    ] = True,
    max_input_grid: Annotated[
        Optional[int], typer.Option(help="Largest input volume the volume engines take, voxels per axis (512).")
    ] = None,
    gpu: Annotated[int, typer.Option("--gpu", help="CUDA device index.")] = 0,
    check: Annotated[bool, typer.Option(help="Only say whether the engine set BUNDLE is usable here.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing engine set.")] = False,
    trust_unvalidated: Annotated[bool, typer.Option(help="Build from a bundle not recorded as validated.")] = False,
) -> None:
    """Build strongly typed TensorRT engines from a bundle (precision comes from the ONNX graphs).

    Examples: ldseg-export build-engine demo-fp16 -o demo-engines; ldseg-export build-engine --check demo-engines
    """
    from ldseg.errors import BackendUnavailable, OutputError
    from ldseg.runtime.artifacts.engines import engine_set_problems
    from ldseg.runtime.backends.tensorrt.probe import detect_environment

    if check:
        problems = engine_set_problems(bundle, detect_environment(gpu))
        if not problems:
            out.print(f"{bundle}: usable on this machine")
            return
        for problem in problems:
            console.print(f"{bundle}: {problem.message}", highlight=False)
        kinds = {problem.kind for problem in problems}
        raise (ArtifactError if "artifact" in kinds else BackendUnavailable)(f"{bundle}: not usable here")
    if output is None:
        raise OutputError("build-engine needs -o ENGINES")
    from ldseg.export.tensorrt_build import build_engines

    built = build_engines(
        bundle,
        output,
        precision=precision,
        max_batch=max_batch,
        opt_batch=opt_batch,
        workspace_gb=workspace,
        timing_cache=timing_cache,
        dla_core=dla,
        optimization_level=builder_optimization_level,
        include_denoiser=include_denoiser,
        volume_ops=volume_ops,
        **({} if max_input_grid is None else {"max_input_grid": max_input_grid}),
        device=gpu,
        overwrite=overwrite,
        trust_unvalidated=trust_unvalidated,
        progress=lambda line: console.print(line, highlight=False),
    )
    out.print(str(built), highlight=False)


@export_typer.command("calibrate")
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="FP32 bundle to quantize.")],
    data: Annotated[str, typer.Option(help="Folder of NIfTI volumes, or 'phantoms'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="INT8 bundle folder to write.")],
    max_volumes: Annotated[int, typer.Option(help="Volumes used for calibration.")] = 8,
    holdout: Annotated[int, typer.Option(help="Further volumes held out for the accuracy report.")] = 2,
    method: Annotated[CalibrationMethod, typer.Option(help="Activation range estimator.")] = CalibrationMethod.minmax,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    keep_failed: Annotated[
        bool, typer.Option(help="Write the INT8 bundle even if it misses its accuracy target.")
    ] = False,
    trust_unvalidated: Annotated[bool, typer.Option(help="Calibrate a bundle not recorded as validated.")] = False,
) -> None:
    """INT8 (Q/DQ) bundle calibrated on real pipeline activations, with an accuracy report.

    Example: ldseg-export calibrate demo-bundle --data phantoms -o demo-int8
    """
    from ldseg.calibration import calibrate as run_calibration

    report = run_calibration(
        bundle,
        data,
        output,
        max_volumes=max_volumes,
        method=method.value,
        holdout=holdout,
        overwrite=overwrite,
        progress=lambda line: console.print(line, highlight=False),
        keep_failed=keep_failed,
        trust_unvalidated=trust_unvalidated,
    )
    out.print(report.to_markdown())


@export_typer.command("inspect")
def inspect(artifact: Annotated[Path, typer.Argument(help="A checkpoint (.safetensors) or a bundle folder.")]) -> None:
    """Print what an artifact is: config, trained components, hashes (and graphs for bundles)."""
    import json

    from ldseg.model.checkpoint_file import read_metadata

    if artifact.is_dir():
        from ldseg.export.inspect import inspect_bundle

        out.print(inspect_bundle(artifact))
        return
    out.print_json(json.dumps(read_metadata(artifact)))


cache_typer = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The artifact cache (LDSEG_CACHE): bundles and engines built from checkpoints.",
)
export_typer.add_typer(cache_typer, name="cache")


@cache_typer.command("list")
def cache_list() -> None:
    """Entries with their size and last use, most recent first. Example: ldseg-export cache list"""
    import datetime

    from rich.table import Table

    from ldseg.runtime.artifacts.cache import cache_root
    from ldseg.runtime.artifacts.cache_listing import list_entries

    root = cache_root()
    entries = list_entries(root)
    table = Table(
        title=f"{root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
        f"{sum(e.bytes for e in entries) / 2**20:.1f} MiB"
    )
    for column in ("kind", "entry", "MiB", "last used"):
        table.add_column(column, justify="right" if column == "MiB" else "left", overflow="fold")
    for e in entries:
        used = datetime.datetime.fromtimestamp(e.last_used).isoformat(sep=" ", timespec="seconds")
        table.add_row(e.kind, e.name, f"{e.bytes / 2**20:.1f}", used)
    out.print(table)


@cache_typer.command("clear")
def cache_clear(
    older_than: Annotated[
        Optional[float], typer.Option("--older-than", help="Only entries not used for this many days.", metavar="DAYS")
    ] = None,
) -> None:
    """Remove entries (all, or those unused for DAYS). Example: ldseg-export cache clear --older-than 30"""
    from ldseg.runtime.artifacts.cache import cache_root
    from ldseg.runtime.artifacts.cache_listing import clear

    if older_than is not None and older_than < 0:
        raise typer.BadParameter("--older-than must be >= 0 days")
    root = cache_root()
    removed, busy = clear(root, older_than_days=older_than)
    for item in busy:
        console.print(f"{item.path}: in use by another process (being built); left alone", highlight=False)
    out.print(
        f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} "
        f"({sum(e.bytes for e in removed) / 2**20:.1f} MiB) from {root}",
        highlight=False,
    )


main = entry(export_typer, "ldseg-export")
