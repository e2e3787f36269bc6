"""Console scripts. They parse, call the package, and print; errors become one line and an exit code."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ldseg.errors import ArtifactError, InputError, LdsegError
from ldseg.io.atomic import ensure_output_dir

console = Console(stderr=True)
out = Console()


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _entry(app: typer.Typer, prog: str) -> Callable[[], None]:
    """Run a Typer app; LdsegError -> 'prog: error: message' and its exit code, no traceback."""

    def main() -> None:
        # nibabel prints header fixes through its own stderr handler, in lines naming no file;
        # a refused file gets our one line instead.
        logging.getLogger("nibabel.global").setLevel(logging.CRITICAL)
        signal.signal(signal.SIGTERM, _terminate)  # clean up temp files as on Ctrl-C
        # Typer reports usage errors itself (exit 2); ours surface here as one line.
        try:
            app(prog_name=prog)
        except LdsegError as exc:
            console.print(f"[bold red]{prog}: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)

    return main


# --------------------------------------------------------------------------- ldseg-run
run_typer = typer.Typer(add_completion=False, help="Segment NIfTI volumes or 2D images with LDSeg.")


@run_typer.command()
def run(
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Files or folders to segment.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("ldseg-out"),
    checkpoint: Annotated[
        Optional[str], typer.Option(help="Checkpoint path, or 'demo' (the bundled model; the default).")
    ] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="Exported ONNX bundle (ldseg-export onnx).")] = None,
    engines: Annotated[Optional[Path], typer.Option(help="TensorRT engine set (ldseg-export build-engine).")] = None,
    backend: Annotated[str, typer.Option(help="auto | torch | onnxruntime | tensorrt")] = "auto",
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: checkpoint's, 15).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim | ddpm (default: checkpoint's).")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed; sample k uses seed + k.")] = 0,
    samples: Annotated[int, typer.Option(help="K samples as one batch: adds confidence and entropy maps.")] = 1,
    save_probabilities: Annotated[bool, typer.Option(help="Also write per-class probability maps.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    skip_existing: Annotated[bool, typer.Option(
        help="Skip inputs whose outputs all exist already (resume a folder run).")] = False,
    fail_fast: Annotated[bool, typer.Option(help="Stop at the first bad input.")] = False,
    reconstruct: Annotated[
        Optional[Path], typer.Option(help="Debug: encode this label and decode it (no denoiser).")
    ] = None,
    demo: Annotated[bool, typer.Option(help="Segment a fresh synthetic phantom and print its Dice.")] = False,
    demo_seed: Annotated[int, typer.Option(help="Phantom seed for --demo.")] = 0,
    trust_unvalidated: Annotated[bool, typer.Option(
        help="Run a bundle whose manifest records a failed validation or none.")] = False,
) -> None:
    """Examples: `ldseg-run --demo -o out/`, `ldseg-run scan.nii.gz -o out/`, `ldseg-run scans/ -o out/ --samples 8`."""
    from ldseg.runtime.select import RECONSTRUCT_NEEDS, Source, load_model, select_backend
    from ldseg.runtime.session import RunOptions

    if samples < 1 or (steps is not None and steps < 1):
        raise typer.BadParameter("--samples and --steps must be at least 1")
    if overwrite and skip_existing:
        raise typer.BadParameter("--overwrite and --skip-existing contradict each other: choose one")
    out_dir = ensure_output_dir(output)
    opts = RunOptions(steps, sampler, seed, samples, save_probabilities, overwrite, fail_fast, skip_existing)
    if bundle is None and engines is None and checkpoint is None:
        checkpoint = "demo"
    if reconstruct is not None:
        _reconstruct(load_model(checkpoint or "demo", RECONSTRUCT_NEEDS), reconstruct, out_dir, overwrite)
        return
    selection = select_backend(Source(checkpoint, bundle, engines, trust_unvalidated), backend, device)
    chosen, cfg = selection.backend, selection.config
    console.print(f"backend: [bold]{chosen.name}[/] on {chosen.device}, {chosen.precision} ({selection.why})")
    if demo:
        _demo(cfg, chosen, out_dir, opts, demo_seed)
        return
    paths = _expand_inputs(inputs or [])
    summary = _run_with_progress(paths, out_dir, chosen, cfg, opts)
    if summary.failures:
        failure = LdsegError(f"{len(summary.failures)} of {len(paths)} input(s) failed (listed above)")
        codes = {exc.exit_code for _, exc in summary.failures}
        failure.exit_code = codes.pop() if len(codes) == 1 else 1  # one kind of failure: its own code
        raise failure


def _expand_inputs(inputs: list[Path]) -> list[Path]:
    from ldseg.runtime.volumes import is_input_file

    if not inputs:
        raise typer.BadParameter("give input files or folders, or --demo")
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and is_input_file(p))
            if not found:
                raise InputError(f"{item}: no .nii/.nii.gz/.png/.bmp/.jpg/.tif files in this folder")
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise InputError(f"{item}: no such file or folder")
    return paths


def _run_with_progress(paths: list[Path], out_dir: Path, backend: Any, cfg: Any, opts: Any) -> Any:
    from ldseg.runtime.session import run_files

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("segmenting", total=len(paths))

        def done(path: Path, error: str | None) -> None:
            if error:
                progress.console.print(f"[red]failed:[/] {escape(error)}", highlight=False, soft_wrap=True)
            progress.advance(task)

        summary = run_files(paths, out_dir, backend, cfg, opts, on_done=done)
    table = Table(title=f"{summary.volumes} volume(s) in {summary.seconds:.1f} s "
                  f"({summary.volumes / max(summary.seconds, 1e-9):.2f} volumes/s)")
    table.add_column("stage")
    table.add_column("median ms", justify="right")
    for stage, values in summary.stage_ms.items():
        table.add_row(stage, f"{np.median(values):.1f}")
    table.caption = f"backend {backend.name}, device {backend.device}, {backend.precision}"
    console.print(table)
    if summary.skipped:
        console.print(f"skipped {len(summary.skipped)} input(s) whose outputs exist (--skip-existing)")
    for path in summary.written:
        out.print(str(path), highlight=False, markup=False, soft_wrap=True)
    return summary


def _reconstruct(model: Any, label_path: Path, out_dir: Path, overwrite: bool) -> None:
    import torch

    from ldseg.runtime.volumes import output_path, prepare, prepare_label, to_input_grid, write_map

    prepared = prepare(label_path, model.cfg) if model.cfg.spatial_dims == 2 else None
    labels = prepare_label(label_path, model.cfg)
    probs = model.reconstruct(torch.from_numpy(labels[None].astype(np.int64)))[0].numpy()
    if prepared is None:  # 3D: the label volume itself carries the geometry
        from ldseg.io.nifti import read_label_volume
        from ldseg.runtime.volumes import Prepared

        prepared = Prepared(label_path, np.zeros(0, np.float32), read_label_volume(label_path))
    target = output_path(out_dir, label_path, model.cfg, "_reconstruction")
    write_map(target, prepared, to_input_grid(prepared, probs), overwrite=overwrite, dtype=np.uint8)
    out.print(str(target), highlight=False)


def _demo(cfg: Any, backend: Any, out_dir: Path, opts: Any, seed: int) -> None:
    from ldseg.data.phantoms import make_phantom, write_phantom_nifti
    from ldseg.io.nifti import read_label_volume
    from ldseg.metrics import dice_per_class

    phantom = make_phantom(seed, cfg.image_size, cfg.num_classes)
    image_path, truth_path = out_dir / f"phantom{seed}.nii.gz", out_dir / f"phantom{seed}_truth.nii.gz"
    write_phantom_nifti(phantom, image_path, truth_path, overwrite=opts.overwrite)
    console.print(f"demo: phantom seed {seed} written to {image_path}")
    summary = _run_with_progress([image_path], out_dir, backend, cfg, opts)
    if summary.failures:
        raise summary.failures[0][1]
    seg = read_label_volume(out_dir / f"phantom{seed}_seg.nii.gz").array
    truth = read_label_volume(truth_path).array
    scores = dice_per_class(seg, truth, cfg.num_classes)
    line = ", ".join(f"class {c} {d:.3f}" for c, d in scores.items())
    out.print(f"Dice vs phantom truth: {line}; mean {np.mean(list(scores.values())):.3f}")


# --------------------------------------------------------------------------- ldseg-export
export_typer = typer.Typer(add_completion=False, no_args_is_help=True, help="Import, export and inspect models.")


@export_typer.command("import-keras")
def import_keras(
    preset: Annotated[str, typer.Option(help="knee3d | glas2d")],
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
    model = LDSeg(get_preset(preset))
    files = {"label_encoder": label_encoder, "label_decoder": label_decoder,
             "image_encoder": image_encoder, "denoiser": denoiser}
    for name, path in files.items():
        if path is None:
            console.print(f"{name}: no file given, left untrained (random)")
            continue
        if not path.is_file():
            raise ArtifactError(f"{path}: no such weight file")
        load_keras_weights(getattr(model, name), path)
        model.trained[name] = True
        console.print(f"{name}: imported {path}")
    digest = save_checkpoint(model.eval(), output, overwrite=overwrite,
                             extra={"source": {k: str(v) for k, v in files.items() if v is not None}})
    out.print(f"{output} (sha256 {digest[:12]}, trained: "
              f"{', '.join(k for k, v in model.trained.items() if v) or 'nothing'})")


@export_typer.command("onnx")
def export_onnx(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint path, or 'demo'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle folder to write.")],
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer).")] = 18,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 (normalizations, softmax stay FP32).")] = "fp32",
    batch: Annotated[int, typer.Option(help="Batch the graphs are traced at (the axis stays dynamic).")] = 1,
    validate: Annotated[bool, typer.Option(
        help="Compare ONNX Runtime with PyTorch before writing; the manifest records the verdict.")] = True,
    keep_failed: Annotated[bool, typer.Option(help="Write the bundle even if it fails validation.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
) -> None:
    """Write a validated, self-describing ONNX bundle. Example: ldseg-export onnx demo -o demo-bundle"""
    from ldseg.export.exporter import export_bundle
    from ldseg.model.checkpoint import load_checkpoint
    from ldseg.runtime.select import resolve_checkpoint

    model = load_checkpoint(resolve_checkpoint(checkpoint))
    console.print(f"exporting {model.cfg.preset} ({precision}, opset {opset}) to {output}")
    try:
        bundle = export_bundle(model, output, opset=opset, precision=precision, batch=batch, overwrite=overwrite,
                               progress=lambda line: console.print(line, highlight=False), validate=validate,
                               keep_failed=keep_failed, on_validated=lambda report: out.print(report.table()))
    except ValueError as exc:  # bad option values
        raise typer.BadParameter(str(exc)) from exc
    out.print(str(bundle), highlight=False)


@export_typer.command("build-engine")
def build_engine(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder, or with --check an engine set.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Engine set folder.")] = None,
    precision: Annotated[str, typer.Option(help="best | fp32 | fp16 | bf16 | int8 | fp8 (must match the bundle).")] = "best",
    max_batch: Annotated[int, typer.Option("--max-batch", "--batch", help="Largest batch (K samples).")] = 1,
    opt_batch: Annotated[Optional[int], typer.Option(help="Batch to tune for (default: max).")] = None,
    workspace: Annotated[Optional[float], typer.Option("--workspace", help="Workspace limit in GB.")] = None,
    timing_cache: Annotated[Optional[Path], typer.Option(help="Persistent timing cache file.")] = None,
    dla: Annotated[Optional[int], typer.Option("--dla", help="Jetson: DLA core, with GPU fallback.")] = None,
    builder_optimization_level: Annotated[Optional[int], typer.Option(help="0-5 (TensorRT default 3).")] = None,
    include_denoiser: Annotated[bool, typer.Option(help="Also build the raw denoiser graph.")] = False,
    gpu: Annotated[int, typer.Option("--gpu", help="CUDA device index.")] = 0,
    check: Annotated[bool, typer.Option(help="Only say whether the engine set BUNDLE is usable here.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing engine set.")] = False,
    trust_unvalidated: Annotated[bool, typer.Option(help="Build from a bundle not recorded as validated.")] = False,
) -> None:
    """Build strongly typed TensorRT engines from a bundle (precision comes from the ONNX graphs).

    Examples: ldseg-export build-engine demo-fp16 -o demo-engines; ldseg-export build-engine --check demo-engines
    """
    from ldseg.errors import BackendUnavailable, OutputError
    from ldseg.export.engines import detect_environment, engine_set_problems

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

    built = build_engines(bundle, output, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                          workspace_gb=workspace, timing_cache=timing_cache, dla_core=dla,
                          optimization_level=builder_optimization_level, include_denoiser=include_denoiser,
                          device=gpu, overwrite=overwrite, trust_unvalidated=trust_unvalidated,
                          progress=lambda line: console.print(line, highlight=False))
    out.print(str(built), highlight=False)


@export_typer.command("calibrate")
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="FP32 bundle to quantize.")],
    data: Annotated[str, typer.Option(help="Folder of NIfTI volumes, or 'phantoms'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="INT8 bundle folder to write.")],
    max_volumes: Annotated[int, typer.Option(help="Volumes used for calibration.")] = 8,
    holdout: Annotated[int, typer.Option(help="Further volumes held out for the accuracy report.")] = 2,
    method: Annotated[str, typer.Option(help="minmax | entropy | percentile")] = "minmax",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    keep_failed: Annotated[bool, typer.Option(
        help="Write the INT8 bundle even if it misses its accuracy target.")] = False,
    trust_unvalidated: Annotated[bool, typer.Option(help="Calibrate a bundle not recorded as validated.")] = False,
) -> None:
    """INT8 (Q/DQ) bundle calibrated on real pipeline activations, with an accuracy report.

    Example: ldseg-export calibrate demo-bundle --data phantoms -o demo-int8
    """
    from ldseg.calibration import calibrate as run_calibration

    report = run_calibration(bundle, data, output, max_volumes=max_volumes, method=method, holdout=holdout,
                             overwrite=overwrite, progress=lambda line: console.print(line, highlight=False),
                             keep_failed=keep_failed, trust_unvalidated=trust_unvalidated)
    out.print(report.to_markdown())


@export_typer.command("inspect")
def inspect(artifact: Annotated[Path, typer.Argument(help="A checkpoint (.safetensors) or a bundle folder.")]) -> None:
    """Print what an artifact is: config, trained components, hashes (and graphs for bundles)."""
    import json

    from ldseg.model.checkpoint import read_metadata

    if artifact.is_dir():
        from ldseg.export.inspect import inspect_bundle

        out.print(inspect_bundle(artifact))
        return
    out.print_json(json.dumps(read_metadata(artifact)))


# --------------------------------------------------------------------------- ldseg-train
train_typer = typer.Typer(add_completion=False, help="Train LDSeg (official recipe) on NIfTI pairs or phantoms.")


@train_typer.command()
def train(
    preset: Annotated[str, typer.Option(help="knee3d | glas2d | demo")],
    data: Annotated[str, typer.Option(help="DIR with images/NAME.nii.gz + labels/NAME.nii.gz, or 'phantoms'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write (.safetensors).")],
    init: Annotated[Optional[Path], typer.Option(help="Start from this checkpoint.")] = None,
    freeze: Annotated[str, typer.Option(
        help="'autoencoder': train image encoder + denoiser; 'encoders': the denoiser alone (latents cached).")] = "none",
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (wins over --epochs).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training set.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 2,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    lr_schedule: Annotated[str, typer.Option(help="constant | cosine")] = "constant",
    autoencoder_steps: Annotated[int, typer.Option(help="First N steps train the label autoencoder alone.")] = 0,
    noise_draws: Annotated[int, typer.Option(help="With --freeze: (t, noise) draws per image per step.")] = 1,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Validate and save every N steps (default: each epoch).")] = None,
    flips: Annotated[bool, typer.Option(help="Random flips along each spatial axis.")] = False,
    num_train: Annotated[int, typer.Option(help="Phantoms per epoch (with --data phantoms).")] = 256,
    val: Annotated[int, typer.Option(help="Validation samples (0: none).")] = 4,
    device: Annotated[str, typer.Option(help="cpu | cuda (bit-reproducible on cpu only)")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch.")] = None,
    seed: Annotated[int, typer.Option(help="Weights, data order, noise and augmentation seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run saved at --output.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output.")] = False,
) -> None:
    """Example (the bundled demo model, see README): ldseg-train --preset demo --data phantoms -o ae.safetensors --steps 400 --autoencoder-steps 400"""
    import json

    import torch

    from ldseg.training import TrainOptions
    from ldseg.training.trainer import train as run_training

    if threads:
        torch.set_num_threads(threads)
    options = TrainOptions(
        preset=preset, data=data, output=output, init=init, freeze=freeze,  # type: ignore[arg-type]
        steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, device=device, resume=resume, seed=seed,
        overwrite=overwrite, num_train=num_train, val=val, autoencoder_steps=autoencoder_steps,
        noise_draws=noise_draws, lr_schedule=lr_schedule,  # type: ignore[arg-type]
        checkpoint_every=checkpoint_every, flips=flips,
    )
    result = run_training(options)
    out.print_json(json.dumps({"checkpoint": str(result.checkpoint), "step": result.step,
                               "val_dice": result.val_dice, "wall_time_s": round(result.wall_time_s, 1)}))


from ldseg.bench.command import bench_typer  # noqa: E402  (light: heavy imports happen per command)

run_app = _entry(run_typer, "ldseg-run")
bench_app = _entry(bench_typer, "ldseg-bench")
train_app = _entry(train_typer, "ldseg-train")
export_app = _entry(export_typer, "ldseg-export")
