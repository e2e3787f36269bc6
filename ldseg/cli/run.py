"""`ldseg-run`: segment files, folders or a phantom; a thin layer over the Python API (ldseg.api)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ldseg.cli.common import (
    BackendChoice,
    DeviceChoice,
    OutputType,
    RunPrecision,
    SamplerChoice,
    SegType,
    VersionOption,
    console,
    entry,
    out,
    value,
)
from ldseg.errors import InputError, LdsegError
from ldseg.io.atomic import ensure_output_dir

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
    backend: Annotated[
        BackendChoice, typer.Option(help="Runtime; auto picks the fastest available.")
    ] = BackendChoice.auto,
    device: Annotated[DeviceChoice, typer.Option(help="Where to run; auto prefers a GPU.")] = DeviceChoice.auto,
    gpu: Annotated[
        Optional[int],
        typer.Option(help="GPU index for every backend (torch cuda:N, ONNX Runtime device_id, TensorRT); default 0."),
    ] = None,
    precision: Annotated[
        RunPrecision,
        typer.Option(
            help="auto: what the source holds (never a silent reduction); bf16 (openvino, CPUs with native BF16), "
            "int8 (an int8 bundle)."
        ),
    ] = RunPrecision.auto,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all cores).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: checkpoint's, 15).")] = None,
    sampler: Annotated[Optional[SamplerChoice], typer.Option(help="Sampler (default: the checkpoint's).")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed; sample k uses seed + k.")] = 0,
    samples: Annotated[int, typer.Option(help="K samples as one batch: adds confidence and entropy maps.")] = 1,
    save_probabilities: Annotated[bool, typer.Option(help="Also write per-class probability maps.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    skip_existing: Annotated[
        bool, typer.Option(help="Skip inputs whose outputs all exist already (resume a folder run).")
    ] = False,
    fail_fast: Annotated[bool, typer.Option(help="Stop at the first bad input.")] = False,
    reconstruct: Annotated[
        Optional[Path], typer.Option(help="Debug: encode this label and decode it (no denoiser).")
    ] = None,
    demo: Annotated[bool, typer.Option(help="Segment a fresh synthetic phantom and print its Dice.")] = False,
    demo_seed: Annotated[int, typer.Option(help="Phantom seed for --demo.")] = 0,
    output_type: Annotated[
        Optional[list[OutputType]], typer.Option(help="Output format; repeat for several (default nifti).")
    ] = None,
    seg_type: Annotated[
        SegType, typer.Option(help="DICOM SEG: binary (labels) or fractional (probabilities).")
    ] = SegType.binary,
    series: Annotated[
        Optional[str], typer.Option(help="SeriesInstanceUID to read from a DICOM folder holding several series.")
    ] = None,
    preview: Annotated[bool, typer.Option(help="Write <name>_preview.png: slices, overlay, entropy (K>1).")] = False,
    qc: Annotated[bool, typer.Option(help="Write <name>_qc.json: class volumes, components, uncertainty.")] = False,
    labels: Annotated[
        Optional[Path],
        typer.Option(help="Folder of reference labels named as the inputs: Dice in the QC numbers (implies --qc)."),
    ] = None,
    report: Annotated[
        bool, typer.Option(help="Write report.html, most uncertain volume first (implies --preview --qc).")
    ] = False,
    trust_unvalidated: Annotated[
        bool, typer.Option(help="Run a bundle whose manifest records a failed validation or none.")
    ] = False,
    cache: Annotated[
        bool,
        typer.Option(
            help="Keep a checkpoint's exported bundle/engines in the artifact cache (LDSEG_CACHE); --no-cache "
            "exports into a temporary folder for this run only."
        ),
    ] = True,
    version: VersionOption = None,
) -> None:
    """Examples: `ldseg-run --demo -o out/`, `ldseg-run scan.nii.gz -o out/`, `ldseg-run scans/ -o out/ --samples 8`,
    `ldseg-run dicom_folder/ --output-type dicom-seg -o out/`."""
    from ldseg.api import Segmenter, expand_inputs
    from ldseg.runtime.outputs import check_output_options
    from ldseg.runtime.select import RECONSTRUCT_NEEDS, load_model

    if samples < 1 or (steps is not None and steps < 1):
        raise typer.BadParameter("--samples and --steps must be at least 1")
    if gpu is not None and (gpu < 0 or device == DeviceChoice.cpu):
        raise typer.BadParameter("--gpu N is a GPU index >= 0, and contradicts --device cpu")
    if threads is not None and threads < 1:
        raise typer.BadParameter("--threads must be at least 1")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)  # the torch backend's (and --reconstruct's) intra-op threads
    if overwrite and skip_existing:
        raise typer.BadParameter("--overwrite and --skip-existing contradict each other: choose one")
    if not demo and reconstruct is None and not inputs:
        raise typer.BadParameter("give input files or folders, or --demo")
    if labels is not None and not labels.is_dir():
        raise InputError(f"{labels}: --labels needs a folder of reference labels")
    types = tuple(dict.fromkeys(t.value for t in output_type or [OutputType.nifti]))
    if demo and types != ("nifti",):
        raise typer.BadParameter("--demo segments a NIfTI phantom and scores the NIfTI result: leave out --output-type")
    out_dir = ensure_output_dir(output)
    if reconstruct is not None:
        _reconstruct(load_model(checkpoint or "demo", RECONSTRUCT_NEEDS), reconstruct, out_dir, overwrite)
        return
    paths = [] if demo else expand_inputs(inputs or [])  # a missing input is reported before any export
    with Segmenter(
        checkpoint,
        bundle=bundle,
        engines=engines,
        backend=backend.value,
        device=device.value,
        gpu=gpu or 0,
        cache=cache,
        steps=steps,
        sampler=value(sampler),
        seed=seed,
        samples=samples,
        trust_unvalidated=trust_unvalidated,
        precision=precision.value,
        threads=threads,
        warn_demo=not demo,
        reporter=ConsoleReporter(),
    ) as seg:
        chosen, cfg = seg.backend, seg.config
        try:
            check_output_options(cfg, types, seg_type.value, samples > 1 or save_probabilities)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        console.print(f"backend: [bold]{chosen.name}[/] on {chosen.device}, {chosen.precision} ({escape(seg.why)})")
        extras, report_path = None, None
        write = {
            "probabilities": save_probabilities,
            "overwrite": overwrite,
            "skip_existing": skip_existing,
            "fail_fast": fail_fast,
            "output_types": types,
            "seg_type": seg_type.value,
            "series": series,
        }
        if preview or qc or report or labels is not None:  # ldseg.qc (matplotlib, jinja2) only when asked
            from ldseg.qc.run import qc_extras, report_target, write_run_report

            extras = qc_extras(cfg, samples, preview=preview, qc=qc, labels=labels, report=report)
            report_opts = dataclasses.replace(seg.options, overwrite=overwrite, skip_existing=skip_existing)
            report_path = report_target(out_dir, report_opts) if report else None  # refused before any compute
        if demo:
            summary = _demo(seg, out_dir, demo_seed, extras, write)
        else:
            summary = _run_with_progress(seg, paths, out_dir, extras, write)
        if report_path is not None and extras is not None:
            out.print(str(write_run_report(report_path, summary, extras, chosen, cfg, report_opts)), highlight=False)
    if summary.failures:
        failure = LdsegError(f"{len(summary.failures)} of {len(paths)} input(s) failed (listed above)")
        codes = {exc.exit_code for _, exc in summary.failures}
        failure.exit_code = codes.pop() if len(codes) == 1 else 1  # one kind of failure: its own code
        raise failure


class ConsoleReporter:
    """The artifact cache and the demo warning, on the console: first builds with a progress bar."""

    def note(self, line: str) -> None:
        console.print(escape(line), highlight=False, soft_wrap=True)

    def warn(self, line: str) -> None:
        console.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def building(self, action: str, path: Path) -> Iterator[Callable[[str], None]]:
        console.print(
            f"first use: {escape(action)} into the cache at {escape(str(path))}", highlight=False, soft_wrap=True
        )
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(escape(action), total=None)
            yield lambda line: progress.update(task, description=escape(line))


def _run_with_progress(seg: Any, paths: list[Path], out_dir: Path, extras: Any, write: dict[str, Any]) -> Any:
    backend = seg.backend
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("segmenting", total=len(paths))

        def done(path: Path, error: str | None) -> None:
            if error:
                progress.console.print(f"[red]failed:[/] {escape(error)}", highlight=False, soft_wrap=True)
            progress.advance(task)

        summary = seg.write(paths, out_dir, extras=extras, on_done=done, **write)
    table = Table(
        title=f"{summary.volumes} volume(s) in {summary.seconds:.1f} s "
        f"({summary.volumes / max(summary.seconds, 1e-9):.2f} volumes/s)"
    )
    table.add_column("stage")
    table.add_column("median ms", justify="right")
    for stage, values in summary.stage_ms.items():
        table.add_row(stage, f"{np.median(values):.1f}")
    table.caption = f"backend {backend.name}, device {backend.device}, {backend.precision}"
    console.print(table)
    if summary.records:
        from ldseg.qc.report import one_line

        for record in summary.records:
            console.print(one_line(record), highlight=False, markup=False, soft_wrap=True)
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


def _demo(seg: Any, out_dir: Path, seed: int, extras: Any, write: dict[str, Any]) -> Any:
    from ldseg.data.phantoms import make_phantom, write_phantom_nifti
    from ldseg.io.nifti import read_label_volume
    from ldseg.metrics import dice_per_class

    cfg = seg.config
    phantom = make_phantom(seed, cfg.image_size, cfg.num_classes)
    image_path, truth_path = out_dir / f"phantom{seed}.nii.gz", out_dir / f"phantom{seed}_truth.nii.gz"
    write_phantom_nifti(phantom, image_path, truth_path, overwrite=write["overwrite"])
    console.print(f"demo: phantom seed {seed} written to {image_path}")
    summary = _run_with_progress(seg, [image_path], out_dir, extras, write)
    if summary.failures:
        raise summary.failures[0][1]
    seg = read_label_volume(out_dir / f"phantom{seed}_seg.nii.gz").array
    truth = read_label_volume(truth_path).array
    scores = dice_per_class(seg, truth, cfg.num_classes)
    line = ", ".join(f"class {c} {d:.3f}" for c, d in scores.items())
    out.print(f"Dice vs phantom truth: {line}; mean {np.mean(list(scores.values())):.3f}")
    return summary


main = entry(run_typer, "ldseg-run")
