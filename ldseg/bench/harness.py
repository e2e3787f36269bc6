"""run_benchmark: every (steps, batch) x target, beside the torch FP32 eager reference, into one folder.

results.json (schema RESULTS_SCHEMA, documented in benchmarks/README.md), results.md and PNG plots.
For each configuration the reference runs first on the same PipelineInputs (same image, latents,
noise and table), so each row has a speed-up and, where it can disagree, label agreement / Dice
against it (ldseg/bench/accuracy.py); with labelled --data also Dice against the truth.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldseg.bench import machine, plots, report
from ldseg.bench.accuracy import TruthCase, dice_vs_truth, load_truth, row_accuracy, truth_folders, untrained_note
from ldseg.bench.flops import pipeline_flops
from ldseg.bench.pipeline import pipeline_record
from ldseg.bench.probe import DTYPES, OPENVINO_DTYPES, Peak, best_peak
from ldseg.bench.sources import load_images, load_source
from ldseg.bench.stats import summarize
from ldseg.bench.targets import FACTORIES, REFERENCE, Context, Target, Unsupported, build_target, reference
from ldseg.bench.timing import Timer, timer_for
from ldseg.choices import PRECISIONS
from ldseg.errors import InputError, OutputError
from ldseg.io.atomic import atomic_write, ensure_output_dir
from ldseg.model.config import ModelConfig
from ldseg.model.network import LDSeg
from ldseg.runs.volumes import Prepared
from ldseg.runtime.backend import STAGES, Backend, PipelineInputs, PipelineOutputs, make_inputs
from ldseg.runtime.select import resolve_device

RESULTS_SCHEMA = "ldseg-bench/2"  # 2: accuracy null where not meaningful, with a note; vs_truth
Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    output: Path | None = None  # None: benchmarks/results/<machine>-<date>
    preset: str | None = None  # none of preset/checkpoint/bundle: the demo preset
    checkpoint: str | Path | None = None  # a path, or "demo" for the bundled model
    bundle: Path | None = None  # an exported bundle (needs its checkpoint for the reference)
    int8_bundle: Path | None = None  # a calibrated INT8 bundle of the same model, for the int8 rows
    backends: tuple[str, ...] = ("torch", "onnxruntime")
    precisions: tuple[str, ...] = ("fp32",)
    steps: tuple[int, ...] = ()  # empty: the model's default step count
    batch: tuple[int, ...] = (1,)
    repeat: int = 10
    warmup: int = 2
    data: Path | None = None  # a folder of inputs; default synthetic phantoms
    device: str = "auto"
    sampler: str | None = None
    seed: int = 0
    probe_size: int = 2048
    probe_repeat: int = 5
    overwrite: bool = False


OUTPUT_FILES = ("results.json", "results.md", *plots.PLOT_FILES)


def _quiet(_: str) -> None:
    pass


def validate(options: BenchOptions) -> None:
    unknown = [b for b in options.backends if b not in FACTORIES]
    if unknown:
        raise InputError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(FACTORIES)}")
    bad_precisions = [p for p in options.precisions if p not in PRECISIONS]
    if bad_precisions:
        raise InputError(f"unknown precision(s) {', '.join(bad_precisions)}; known: {', '.join(PRECISIONS)}")
    for name, values in (("--steps", options.steps), ("--batch", options.batch)):
        if any(v < 1 for v in values):
            raise InputError(f"{name} values must be at least 1, got {list(values)}")
    if not options.backends or not options.precisions or not options.batch:
        raise InputError("--backends, --precisions and --batch need at least one value each")
    if options.repeat < 1 or options.warmup < 0:
        raise InputError(f"--repeat must be >= 1 and --warmup >= 0, got {options.repeat} and {options.warmup}")
    if options.probe_size < 1 or options.probe_repeat < 1:
        raise InputError("the peak probe needs a size and a repeat of at least 1")


def default_output_dir(info: dict[str, Any]) -> Path:
    return Path("benchmarks/results") / f"{machine.machine_slug(info)}-{dt.date.today().isoformat()}"


def run_benchmark(options: BenchOptions, log: Log = _quiet) -> Path:
    """Measure, then write results.json, results.md and the plots; returns the output folder."""
    validate(options)
    host = machine.machine_info()
    out_dir = Path(options.output or default_output_dir(host))
    existing = [out_dir / f for f in OUTPUT_FILES if (out_dir / f).exists()]
    if existing and not options.overwrite:
        raise OutputError(f"{existing[0]}: exists (use --overwrite)")
    device = resolve_device(options.device)
    source = load_source(options.preset, options.checkpoint, options.bundle, options.seed)
    cfg = source.model.cfg
    steps_list = options.steps or (cfg.diffusion.steps,)
    images, image_info, prepared = load_images(cfg, max(options.batch), options.data, options.seed)
    truth = _truth(cfg, options.data, prepared, image_info)
    # A 3D volume file to time the whole path around the model on (ldseg.bench.pipeline).
    whole_volume = prepared[0].path if prepared and cfg.spatial_dims == 3 else None
    weights_note = untrained_note(source.model.trained)
    if truth is not None:
        _check_probabilities(options.bundle)
    ensure_output_dir(out_dir)  # inputs are fine: make the folder now, not after the measurements
    timer = timer_for(device)
    log(f"model: {source.info['weights']}; device {device}, timer {timer.name}; inputs: {image_info['source']}")

    with tempfile.TemporaryDirectory(prefix="ldseg-bench-") as work:
        ctx = Context(
            source.model,
            device,
            options.bundle,
            Path(work),
            max_batch=max(options.batch),
            probabilities=truth is not None,
            int8_bundle=options.int8_bundle,
        )
        ref = reference(ctx)
        targets, skipped = _targets(options, ctx, ref, log)
        peaks = _peaks(device, options, targets, log)
        rows: list[dict[str, Any]] = []
        for steps in steps_list:
            for batch in options.batch:
                inputs = make_inputs(
                    cfg, images[:batch], [options.seed + k for k in range(batch)], steps, options.sampler
                )
                volume = whole_volume if batch == options.batch[0] else None  # once per backend and steps
                ref_row, ref_labels = _measure(ref, inputs, options, timer, source.model, peaks)
                ref_row["reference"] = True
                for target in [ref, *targets]:  # the reference row first, measured once
                    is_ref = target is ref
                    row, labels = (
                        (ref_row, ref_labels)
                        if is_ref
                        else _measure(target, inputs, options, timer, source.model, peaks)
                    )
                    row["pipeline"] = None if volume is None else _pipeline(target, cfg, volume, steps, options)
                    accuracy = row_accuracy(
                        labels,
                        ref_labels,
                        cfg,
                        is_reference=is_ref,
                        weights_note=weights_note,
                        vs_truth=_vs_truth(target, inputs, truth, cfg),
                    )
                    rows.append(_finish(row, ref_row, accuracy))
                    log(_line(rows[-1]))

    _relative_to(rows, ("onnxruntime", "fp32"))
    results = {
        "schema": RESULTS_SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": host,
        "versions": machine.library_versions(),
        "git": machine.git_state(),
        "device": device,
        "timer": timer.name,
        "model": source.info,
        "inputs": image_info,
        "options": {k: _jsonable(v) for k, v in dataclasses.asdict(options).items()},
        "reference": "/".join(REFERENCE),
        "peaks": {name: peak.to_dict() for name, peak in peaks.items()},
        "skipped": skipped,
        "rows": rows,
    }
    _write(out_dir, results, options.overwrite)
    return out_dir


def _targets(options: BenchOptions, ctx: Context, ref: Target, log: Log) -> tuple[list[Target], list[dict[str, str]]]:
    """Build every requested (backend, precision) before timing anything; the reference's twin is
    not measured twice (on CPU the torch backend *is* torch eager)."""
    targets: list[Target] = []
    skipped: list[dict[str, str]] = []
    log(f"reference: {ref.label} ({ref.source})")
    for name in options.backends:
        for precision in options.precisions:
            log(f"building {name}/{precision}")
            try:
                target = build_target(name, ctx, precision)
            except Unsupported as exc:
                skipped.append({"backend": name, "precision": precision, "reason": str(exc)})
                log(f"skipped {name}/{precision}: {exc}")
                continue
            if target.key == ref.key:
                log(f"{target.label}: same as the reference, measured once")
                continue
            log(f"target: {target.label} ({target.source})")
            targets.append(target)
    return targets, skipped


def _peaks(device: str, options: BenchOptions, targets: list[Target], log: Log) -> dict[str, Peak]:
    """fp32 always, plus each other precision a target runs that has a probe: on CUDA the float ones
    (tensor cores), on CPU bf16 and int8 (best of torch and OpenVINO, see probe.py)."""
    wanted = {"fp32"}
    probed = set(DTYPES) if device.startswith("cuda") else set(OPENVINO_DTYPES)
    wanted |= {t.backend.precision for t in targets if t.backend.precision in probed}
    peaks = {}
    for dtype in sorted(wanted):
        peaks[dtype] = best_peak(device, dtype, options.probe_size, options.probe_repeat)
        log(
            f"peak {dtype} matmul {options.probe_size}^3 on {device}: {peaks[dtype].gflops:.1f} GFLOP/s "
            f"({peaks[dtype].library})"
        )
    return peaks


def _measure(
    target: Target, inputs: PipelineInputs, options: BenchOptions, timer: Timer, model: LDSeg, peaks: dict[str, Peak]
) -> tuple[dict[str, Any], np.ndarray]:
    backend = target.backend
    for _ in range(warmup_runs(backend, options.warmup)):
        backend.run(inputs)
    cuda = target.backend.device.startswith("cuda")
    rss_scope = "row" if machine.reset_peak_rss() else "process"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    outputs: list[PipelineOutputs] = []
    e2e = [timer(lambda: outputs.append(backend.run(inputs))) for _ in range(options.repeat)]
    fns = backend.stage_calls(inputs)
    stage_ms: dict[str, list[float]] = {name: [] for name in STAGES}
    for _ in range(options.repeat):
        for name in STAGES:
            stage_ms[name].append(timer(fns[name]))

    flops = pipeline_flops(model.cfg, inputs.batch)
    peak_dtype = backend.precision if backend.precision in peaks else "fp32"
    peak = peaks[peak_dtype].gflops

    def timed(samples: list[float], count: int) -> dict[str, Any]:
        summary = summarize(samples)
        achieved = count / summary.p50 / 1e6 if count else None
        return {
            "ms": summary.to_dict(),
            "flops": count,
            "gflops_per_s": achieved,
            "roofline": achieved / peak if achieved is not None else None,
        }

    reported: dict[str, list[float]] = {}
    for out in outputs:
        for name, ms in out.stage_ms.items():
            reported.setdefault(name, []).append(ms)
    row: dict[str, Any] = {
        "label": target.label,
        "backend": backend.name,
        "precision": backend.precision,
        "mode": target.mode,
        "device": backend.device,
        "describe": backend.describe(),
        "source": target.source,
        "reference": False,
        "steps": inputs.steps,
        "batch": inputs.batch,
        "repeat": options.repeat,
        "warmup": options.warmup,
        "end_to_end": timed(e2e, flops.end_to_end(inputs.steps)),
        "stages": {name: timed(stage_ms[name], flops.stages(inputs.steps)[name]) for name in STAGES},
        "backend_stage_ms_p50": {name: float(np.median(v)) for name, v in reported.items()},
        "peak_dtype": peak_dtype,
        "memory": {
            "peak_rss_mb": machine.peak_rss_mb(),
            "rss_scope": rss_scope,  # "process": lifetime high-water mark (could not reset it)
            "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,  # torch allocator
            "device_used_mb": _device_used_mb() if cuda else None,  # whole device (ORT/TRT included)
        },
    }
    # What this backend executes (the lean form: phase-form upsampling; exported bundles run it, the
    # torch backend says which form it runs) beside the reference count the rates above use.
    lean = backend.describe().get("form", "lean") == "lean"
    row["executed_flops"] = pipeline_flops(model.cfg, inputs.batch, phase=lean).end_to_end(inputs.steps)
    row["throughput_volumes_per_s"] = inputs.batch / (row["end_to_end"]["ms"]["p50"] / 1e3)
    return row, outputs[-1].labels


def _pipeline(target: Target, cfg: ModelConfig, path: Path, steps: int, options: BenchOptions) -> dict[str, Any]:
    return pipeline_record(
        target.backend,
        cfg,
        path,
        steps=steps,
        sampler=options.sampler,
        seed=options.seed,
        repeat=options.repeat,
        model_warmup=warmup_runs(target.backend, options.warmup),
    )


def warmup_runs(backend: Backend[Any, Any], warmup: int) -> int:
    """Untimed runs before timing, so that no graph capture lands in a timed run, even with --warmup 0:
    up to the capturing request for a backend that captures the pipeline (torch, TensorRT: a shape's
    `capture_from`-th request), three for ONNX Runtime's CUDA graphs (captured on the third run of
    each binding)."""
    from ldseg.runtime.backends.onnxruntime.probe import RUNS_TO_CAPTURE

    if backend.describe().get("cuda_graph", "").startswith("on"):
        return max(warmup, RUNS_TO_CAPTURE)
    return max(warmup, backend.capture_from) if backend.cuda_graph else warmup


def _device_used_mb() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def _truth(
    cfg: ModelConfig, data: Path | None, prepared: list[Prepared] | None, image_info: dict[str, Any]
) -> list[TruthCase] | None:
    """The labels of the inputs when --data has a labels/ folder beside images/."""
    labels_dir = truth_folders(data)[1] if data is not None else None
    if labels_dir is None or prepared is None:
        return None
    image_info["labels"] = str(labels_dir)
    return load_truth(cfg, labels_dir, prepared)


def _check_probabilities(bundle_dir: Path | None) -> None:
    """Dice vs truth needs probabilities: refuse a --bundle without a decoder before timing anything."""
    if bundle_dir is None:
        return
    from ldseg.runtime.artifacts.bundle import load_bundle

    if "decoder" not in load_bundle(bundle_dir).graphs:
        raise InputError(
            f"{bundle_dir}: Dice vs truth (--data with labels/) needs the bundle's decoder graph "
            "(probabilities), which it lacks; export it with all graphs"
        )


def _vs_truth(
    target: Target, inputs: PipelineInputs, truth: list[TruthCase] | None, cfg: ModelConfig
) -> dict[str, Any] | None:
    """Dice against the labels of --data, from one more (untimed) run that returns probabilities."""
    if truth is None:
        return None
    probabilities = target.backend.run(inputs, probabilities=True).probabilities
    assert probabilities is not None
    return dice_vs_truth(probabilities, truth, cfg)


def _finish(row: dict[str, Any], ref_row: dict[str, Any], accuracy: dict[str, Any]) -> dict[str, Any]:
    row["speedup_vs_reference"] = ref_row["end_to_end"]["ms"]["p50"] / row["end_to_end"]["ms"]["p50"]
    row["accuracy"] = accuracy
    return row


def _relative_to(rows: list[dict[str, Any]], baseline: tuple[str, str]) -> None:
    """Each row's speed-up against the `baseline` (backend, precision) row of its (steps, batch), where
    one was measured: e.g. OpenVINO against ONNX Runtime FP32, beside the speed-up against torch eager."""
    key = f"speedup_vs_{'_'.join(baseline)}"
    for row in rows:
        twins = [
            r
            for r in rows
            if (r["backend"], r["precision"]) == baseline and (r["steps"], r["batch"]) == (row["steps"], row["batch"])
        ]
        if twins:
            row[key] = twins[0]["end_to_end"]["ms"]["p50"] / row["end_to_end"]["ms"]["p50"]


def _line(row: dict[str, Any]) -> str:
    e2e, acc = row["end_to_end"], row["accuracy"]
    text = (
        f"{row['label']:<28} steps {row['steps']:>3} batch {row['batch']:>2}: p50 {e2e['ms']['p50']:.1f} ms, "
        f"{row['throughput_volumes_per_s']:.2f} vol/s, x{row['speedup_vs_reference']:.2f}, "
        + (f"agreement {acc['agreement']:.4f}" if acc["agreement"] is not None else acc["note"])
    )
    if acc["vs_truth"]:
        text += ", Dice vs truth " + " / ".join(f"{d:.4f}" for d in acc["vs_truth"]["dice"].values())
    return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def _write(out_dir: Path, results: dict[str, Any], overwrite: bool) -> None:
    texts = {"results.json": json.dumps(results, indent=2) + "\n", "results.md": report.render_results(results)}
    for name, text in texts.items():
        atomic_write(out_dir / name, functools.partial(_write_text, text=text), overwrite)
    plots.write_plots(results, out_dir, overwrite)
