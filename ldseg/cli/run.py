"""`ldseg-run`: segment files, folders or a phantom; a thin layer over the Python API (ldseg.api).

Over 400 lines because one Typer command declares its ~40 options in its signature (about 100
lines of that), and the local, Ray, --demo and --reconstruct modes each render their own summary.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ldseg.choices import OUTPUT_TYPES, SEG_TYPES
from ldseg.cli.common import (
    BackendOption,
    BundleOption,
    CheckpointOption,
    DeviceOption,
    EngineChoice,
    EnginesOption,
    PrecisionOption,
    SamplerOption,
    ThreadsOption,
    VersionOption,
    VolumeOpsOption,
    console,
    entry,
    one_of,
    out,
)
from ldseg.errors import InputError, LdsegError
from ldseg.io.atomic import ensure_output_dir
from ldseg.runs.specs import ModelSpec, SamplingSpec, WriteSpec

if TYPE_CHECKING:
    from ldseg.runs.ray_engine import RayOptions

run_typer = typer.Typer(add_completion=False, help="Segment NIfTI volumes or 2D images with LDSeg.")


@run_typer.command()
def run(
    inputs: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Files, folders, or input lists (.csv/.parquet with a path column, optional label)."),
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("ldseg-out"),
    checkpoint: CheckpointOption = None,
    bundle: BundleOption = None,
    engines: EnginesOption = None,
    backend: BackendOption = "auto",
    device: DeviceOption = "auto",
    gpu: Annotated[
        Optional[int],
        typer.Option(help="GPU index for every backend (torch cuda:N, ONNX Runtime device_id, TensorRT); default 0."),
    ] = None,
    precision: PrecisionOption = "auto",
    threads: ThreadsOption = None,
    volume_ops: VolumeOpsOption = "auto",
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Say why each faster route was skipped (with pip commands).")
    ] = False,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: checkpoint's, 15).")] = None,
    sampler: SamplerOption = None,
    seed: Annotated[int, typer.Option(help="Noise seed; sample k uses seed + k.")] = 0,
    samples: Annotated[int, typer.Option(help="K samples, one encoder run: adds confidence and entropy maps.")] = 1,
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
        Optional[list[str]],
        one_of(OUTPUT_TYPES, help="Output format; repeat for several (default nifti)."),
    ] = None,
    seg_type: Annotated[
        str,
        one_of(SEG_TYPES, help="DICOM SEG: binary (labels) or fractional (probabilities)."),
    ] = "binary",
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
    engine: Annotated[
        EngineChoice,
        typer.Option(help="local: this process; ray: Ray Data, read/write tasks and a pool of model actors."),
    ] = EngineChoice.local,
    address: Annotated[
        Optional[str], typer.Option(help="Ray cluster address (ray start --head); default: Ray on this machine.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Ray: model actors, each holding a warm backend.")] = 1,
    gpus_per_worker: Annotated[
        Optional[float], typer.Option(help="Ray: GPUs per actor (default: 1 where the cluster has GPUs, else 0).")
    ] = None,
    batch: Annotated[int, typer.Option(help="Ray: volumes handed to an actor per call.")] = 1,
    num_parts: Annotated[int, typer.Option(help="Split the inputs into K parts (array jobs)...")] = 1,
    part_id: Annotated[int, typer.Option(help="...and run part i (0-based) of them, by sorted path.")] = 0,
    version: VersionOption = None,
) -> None:
    """Examples: `ldseg-run --demo -o out/`, `ldseg-run scan.nii.gz -o out/`, `ldseg-run scans/ -o out/ --samples 8`,
    `ldseg-run dicom_folder/ --output-type dicom-seg -o out/`, `ldseg-run cohort.csv --engine ray --workers 2 -o out/`.

    Every run keeps <out>/ldseg-run.csv, one row per input; running the same command again skips the
    inputs it records as done and retries the failed ones."""
    from ldseg.api import Segmenter
    from ldseg.runs.cohort import collect_inputs, shard
    from ldseg.runs.head_start import head_start_for
    from ldseg.runs.outputs import check_output_options, run_options
    from ldseg.runs.ray_engine import RayOptions
    from ldseg.runtime.artifacts.source import RECONSTRUCT_NEEDS, load_model
    from ldseg.runtime.devices import nvidia_gpu_present

    # The specs, built once here (a bad value: a usage error in the option's words).
    try:
        if gpu is not None and device == "cpu":
            raise ValueError("--gpu N is a GPU index >= 0, and contradicts --device cpu")
        model = ModelSpec(
            checkpoint,
            bundle,
            engines,
            backend=backend,
            device=device,
            gpu=gpu or 0,
            precision=precision,
            threads=threads,
            max_samples=max(samples, 1),
            cache=cache,
            trust_unvalidated=trust_unvalidated,
            volume_ops=volume_ops,
        )
        sampling = SamplingSpec(steps, sampler, seed, samples)
        write = WriteSpec(
            save_probabilities, overwrite, skip_existing, fail_fast, tuple(output_type or ["nifti"]), seg_type, series
        )
        ray_options = RayOptions(address, workers, gpus_per_worker, batch, threads)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not demo and reconstruct is None and not inputs:
        raise typer.BadParameter("give input files or folders, or --demo")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise typer.BadParameter(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}")
    if engine == EngineChoice.ray and (demo or reconstruct is not None or report or fail_fast):
        raise typer.BadParameter("--demo, --reconstruct, --report and --fail-fast run on the local engine only")
    if labels is not None and not labels.is_dir():
        raise InputError(f"{labels}: --labels needs a folder of reference labels")
    if demo and write.output_types != ("nifti",):
        raise typer.BadParameter("--demo segments a NIfTI phantom and scores the NIfTI result: leave out --output-type")
    out_dir = ensure_output_dir(output)
    if reconstruct is not None:
        reconstruction = load_model(checkpoint or "demo", RECONSTRUCT_NEEDS)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)  # --reconstruct runs the PyTorch model itself
        _reconstruct(reconstruction, reconstruct, out_dir, overwrite)
        return
    # A missing input is reported before any export.
    items = [] if demo else shard(collect_inputs(inputs or [], labels), num_parts, part_id)
    paths = [item.path for item in items]
    if engine == EngineChoice.ray:
        _run_ray(items, out_dir, model, sampling, ray_options, write, preview, qc, labels)
        return
    # The first input is read on a thread while the backend is chosen and built (ldseg.runs.head_start).
    reading = head_start_for(paths, model.checkpoint, model.bundle, model.engines, series)
    with reading, Segmenter.of(model, sampling, warn_demo=not demo, reporter=ConsoleReporter()) as seg:
        chosen, cfg = seg.backend, seg.config
        try:
            check_output_options(cfg, run_options(sampling, write))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        why = seg.why if verbose else seg.selection.brief(nvidia_gpu_present())
        console.print(
            f"backend: [bold]{chosen.name}[/] on {chosen.device}, {chosen.precision} ({escape(why)})",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            f"pre/post-processing: {escape(chosen.describe().get('volume_ops', 'cpu (numpy/scipy)'))}",
            highlight=False,
            soft_wrap=True,
        )
        extras, report_path = None, None
        if preview or qc or report or labels is not None:  # ldseg.qc (matplotlib, jinja2) only when asked
            from ldseg.qc.run import qc_extras, report_target, write_run_report

            extras = qc_extras(cfg, samples, preview=preview, qc=qc, labels=labels, report=report)
            report_opts = run_options(sampling, write)
            report_path = report_target(out_dir, report_opts) if report else None  # refused before any compute
        if demo:
            summary = _demo(seg, out_dir, demo_seed, extras, write)
        else:
            label_of = {item.path: item.label for item in items if item.label is not None}
            summary = _run_with_progress(seg, paths, out_dir, extras, write, label_of)
        if report_path is not None and extras is not None:
            out.print(str(write_run_report(report_path, summary, extras, chosen, cfg, report_opts)), highlight=False)
    if summary.failures:
        raise _some_failed([exc.exit_code for _, exc in summary.failures], len(paths))


def _warn_manifest(problem: Optional[str]) -> None:
    if problem:
        console.print(
            f"[bold yellow]warning:[/] the run manifest is incomplete ({escape(problem)}); a rerun redoes "
            "the inputs it does not record (add --skip-existing to keep whole outputs)",
            highlight=False,
            soft_wrap=True,
        )


def _some_failed(codes: list[int], total: int) -> LdsegError:
    """ "Some inputs failed": the code of their one kind of failure (3 for bad inputs), 1 if mixed."""
    failure = LdsegError(f"{len(codes)} of {total} input(s) failed (listed above and in the run manifest)")
    kinds = set(codes)
    failure.exit_code = kinds.pop() if len(kinds) == 1 else 1
    return failure


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


def _run_with_progress(
    seg: Any, paths: list[Path], out_dir: Path, extras: Any, write: WriteSpec, labels: dict[Path, Path] | None = None
) -> Any:
    backend = seg.backend
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("segmenting", total=len(paths))

        def done(path: Path, error: str | None) -> None:
            if error:
                progress.console.print(f"[red]failed:[/] {escape(error)}", highlight=False, soft_wrap=True)
            progress.advance(task)

        summary = seg.write(paths, out_dir, extras=extras, on_done=done, labels=labels, spec=write)
    # Plain lines around a narrow table: a title or caption would wrap at the table's width.
    console.print(
        f"{summary.volumes} volume(s) in {summary.seconds:.1f} s "
        f"({summary.volumes / max(summary.seconds, 1e-9):.2f} volumes/s) on {backend.name}, {backend.device}, "
        f"{backend.precision}",
        highlight=False,
        soft_wrap=True,
    )
    if summary.stage_ms:
        table = Table()
        table.add_column("stage")
        table.add_column("median ms", justify="right")
        for stage, values in summary.stage_ms.items():
            table.add_row(stage, f"{np.median(values):.1f}")
        console.print(table)
    if summary.records:
        from ldseg.qc.report import one_line

        for record in summary.records:
            console.print(one_line(record), highlight=False, markup=False, soft_wrap=True)
    from ldseg.runs.cohort import CohortStats

    stats = CohortStats.of(summary.rows, len(summary.resumed), summary.seconds)
    for line in stats.lines()[1:]:  # the table's title already gives the count and throughput
        console.print(line, highlight=False, soft_wrap=True)
    _warn_manifest(summary.manifest_problem)
    for path in summary.written:
        out.print(str(path), highlight=False, markup=False, soft_wrap=True)
    return summary


def _run_ray(
    items: list[Any],
    out_dir: Path,
    model: ModelSpec,
    sampling: SamplingSpec,
    ray_options: RayOptions,
    write: WriteSpec,
    preview: bool,
    qc: bool,
    labels: Optional[Path],
) -> None:
    """--engine ray: plan on the driver (no model loaded here), run on Ray, sum up from the rows."""
    from ldseg.api import DEMO_WARNING, Segmenter
    from ldseg.runs.manifest import exit_code_of
    from ldseg.runs.ray_engine import plan_cohort, run_cohort

    def extras_for(cfg: Any) -> Any:
        if not (preview or qc or labels is not None):
            return None
        from ldseg.qc.run import qc_extras

        return qc_extras(cfg, sampling.samples, preview=preview, qc=qc, labels=labels, report=False)

    try:
        plan = plan_cohort(items, out_dir, model, sampling, write, extras_for)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if plan.is_demo:
        console.print(f"[bold yellow]warning:[/] {escape(DEMO_WARNING)}", highlight=False, soft_wrap=True)
    console.print(
        f"engine: [bold]ray[/], {ray_options.workers} worker(s), {len(plan.todo)} to run, "
        f"{len(plan.done)} already done (manifest), {len(plan.skipped)} skipped",
        highlight=False,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("segmenting", total=len(plan.todo))

        def done(row: Any) -> None:
            if row.status == "failed":
                progress.console.print(f"[red]failed:[/] {escape(row.error)}", highlight=False, soft_wrap=True)
            progress.advance(task)

        make_model = functools.partial(Segmenter.of, warn_demo=False)  # what each actor builds its model with
        run, stats = run_cohort(plan, model, sampling, make_model, ray_options, out_dir, on_row=done)
    for line in stats.lines():
        console.print(line, highlight=False)
    _warn_manifest(plan.manifest.problem)
    made = sorted({f"{r.backend} on {r.device}, {r.precision}" for r in run.rows if r.backend})
    if made:
        console.print(f"backend: {'; '.join(made)}", highlight=False)
    for path in run.written:
        out.print(str(path), highlight=False, markup=False, soft_wrap=True)
    failed = [r for r in run.rows if r.status == "failed"]
    if failed:
        raise _some_failed([exit_code_of(r.error_kind) for r in failed], len(items))


def _reconstruct(model: Any, label_path: Path, out_dir: Path, overwrite: bool) -> None:
    import torch

    from ldseg.runs.volumes import output_path, prepare, prepare_label, to_input_grid, write_map

    prepared = prepare(label_path, model.cfg) if model.cfg.spatial_dims == 2 else None
    labels = prepare_label(label_path, model.cfg)
    probs = model.reconstruct(torch.from_numpy(labels[None].astype(np.int64)))[0].numpy()
    if prepared is None:  # 3D: the label volume itself carries the geometry
        from ldseg.io.nifti import read_label_volume
        from ldseg.runs.volumes import Prepared

        prepared = Prepared(label_path, np.zeros(0, np.float32), read_label_volume(label_path))
    target = output_path(out_dir, label_path, model.cfg, "_reconstruction")
    write_map(target, prepared, to_input_grid(prepared, probs), overwrite=overwrite, dtype=np.uint8)
    out.print(str(target), highlight=False)


def _demo(seg: Any, out_dir: Path, seed: int, extras: Any, write: WriteSpec) -> Any:
    from ldseg.data.phantoms import make_phantom, write_phantom_nifti
    from ldseg.io.nifti import read_label_volume
    from ldseg.metrics import dice_per_class

    cfg = seg.config
    phantom = make_phantom(seed, cfg.image_size, cfg.num_classes)
    image_path, truth_path = out_dir / f"phantom{seed}.nii.gz", out_dir / f"phantom{seed}_truth.nii.gz"
    write_phantom_nifti(phantom, image_path, truth_path, overwrite=write.overwrite)
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
