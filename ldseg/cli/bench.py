"""`ldseg-bench` (also `python -m ldseg.bench`): parse options, call ldseg.bench.run_benchmark, print
what it decided and where results went. Comma-separated lists are checked against their choices here
(a usage error, exit 2); everything else the harness checks raises ldseg.errors exceptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldseg.choices import BACKENDS, PRECISIONS
from ldseg.cli.common import DeviceOption, PresetChoice, SamplerOption, VersionOption, console, entry, value

bench_typer = typer.Typer(add_completion=False, help="Benchmark LDSeg backends: latency, throughput, FLOPs, accuracy.")
BENCH_BACKENDS = BACKENDS  # each one a maker in ldseg/bench/targets.py
BENCH_PRECISIONS = PRECISIONS


def parse_list(option: str, text: str, choices: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise typer.BadParameter(f"give a comma-separated list, got {text!r}", param_hint=option)
    unknown = [item for item in items if choices is not None and item not in choices]
    if unknown:
        raise typer.BadParameter(f"{', '.join(unknown)}: choose from {', '.join(choices or ())}", param_hint=option)
    return items


def parse_ints(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in parse_list(option, text))
    except ValueError as exc:
        raise typer.BadParameter(f"comma-separated whole numbers expected, got {text!r}", param_hint=option) from exc


@bench_typer.command()
def bench(
    output: Annotated[
        Optional[Path],
        typer.Option("-o", "--output", help="Result folder (default benchmarks/results/<machine>-<date>)."),
    ] = None,
    preset: Annotated[Optional[PresetChoice], typer.Option(help="A preset with random weights (default demo).")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint path, or 'demo' for the bundled model.")] = None,
    bundle: Annotated[
        Optional[Path], typer.Option(help="Exported bundle for onnxruntime (with --checkpoint for the reference).")
    ] = None,
    int8_bundle: Annotated[
        Optional[Path],
        typer.Option(help="Calibrated INT8 bundle of the same model (ldseg-export calibrate) for the int8 rows."),
    ] = None,
    backends: Annotated[
        str, typer.Option(help="Comma-separated backends (registry: ldseg/bench/targets.py).")
    ] = "torch,onnxruntime",
    precisions: Annotated[str, typer.Option(help="Comma-separated precisions, e.g. fp32,fp16.")] = "fp32",
    steps: Annotated[Optional[str], typer.Option(help="Comma-separated step counts (default: the model's).")] = None,
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1",
    repeat: Annotated[int, typer.Option(help="Timed runs per configuration and per stage.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 2,
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder of inputs, or with images/ and labels/ (adds Dice vs truth); default synthetic phantoms."
        ),
    ] = None,
    device: DeviceOption = "auto",
    sampler: SamplerOption = None,
    seed: Annotated[int, typer.Option(help="Weights (presets), phantoms and noise seed.")] = 0,
    probe_size: Annotated[int, typer.Option(help="Matmul size of the peak probe.")] = 2048,
    probe_repeat: Annotated[int, typer.Option(help="Matmuls timed by the peak probe.")] = 5,
    overwrite: Annotated[bool, typer.Option(help="Replace results in the output folder.")] = False,
    version: VersionOption = None,
) -> None:
    """Examples: `ldseg-bench --preset demo --backends torch,onnxruntime --steps 1,5,15,50 --batch 1,2,4,8`,
    `ldseg-bench --checkpoint demo --repeat 20 -o benchmarks/results/mine`."""
    from ldseg.bench.harness import BenchOptions, run_benchmark  # heavy (torch, matplotlib): only when run

    options = BenchOptions(
        output=output,
        preset=value(preset),
        checkpoint=checkpoint,
        bundle=bundle,
        int8_bundle=int8_bundle,
        backends=parse_list("--backends", backends, BENCH_BACKENDS),
        precisions=parse_list("--precisions", precisions, BENCH_PRECISIONS),
        steps=parse_ints("--steps", steps) if steps is not None else (),
        batch=parse_ints("--batch", batch),
        repeat=repeat,
        warmup=warmup,
        data=data,
        device=device,
        sampler=sampler,
        seed=seed,
        probe_size=probe_size,
        probe_repeat=probe_repeat,
        overwrite=overwrite,
    )
    out_dir = run_benchmark(options, log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    print(out_dir)


main = entry(bench_typer, "ldseg-bench")
