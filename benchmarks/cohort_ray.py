"""Cohort throughput: `ldseg-run --engine ray` (1 and 2 workers) against the local engine, same inputs.

    python benchmarks/cohort_ray.py --volumes 64 -o benchmarks/results/<machine>-<date>/cohort-ray
    python benchmarks/cohort_ray.py --inputs knee-cohort/ --workers 1 -o .../cohort-ray-knee3d -- --bundle knee3d-fp32

Writes N synthetic phantoms (the demo model's grid), then runs each engine as a user would (a fresh
`ldseg-run` process, default backend selection, the artifact cache warmed first so no run pays the
export) into its own folder, and reads the run manifests. Per engine: the whole command's wall time
(process and Ray start included), volumes/s, and the steady state: volumes/s between the first and
the last finished row, which leaves out start-up. Overhead per volume is against the local engine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from ldseg.bench.machine import machine_info
from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.runs.manifest import RunManifest
from ldseg.runtime.artifacts.source import source_config

BIN = Path(sys.executable).parent


def _phantoms(folder: Path, count: int) -> None:
    cfg = source_config("demo", None, None)
    folder.mkdir(parents=True)
    (folder.parent / "truth").mkdir()
    for seed in range(count):
        phantom = make_phantom(seed, cfg.image_size, cfg.num_classes)
        write_phantom_nifti(phantom, folder / f"p{seed:03d}.nii.gz", folder.parent / "truth" / f"p{seed:03d}.nii.gz",
                            overwrite=True)  # fmt: skip


def _run(name: str, inputs: Path, out: Path, extra: list[str]) -> dict[str, object]:
    command = [str(BIN / "ldseg-run"), str(inputs), "-o", str(out), *extra]
    clock = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - clock
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    rows = [r for r in RunManifest(out).latest().values() if r.status == "ok"]
    finished = sorted(datetime.fromisoformat(r.finished).timestamp() for r in rows)
    span = finished[-1] - finished[0]
    latencies = [r.seconds or 0.0 for r in rows]
    return {
        "engine": name,
        "command": " ".join(["ldseg-run", "IN", "-o", "OUT", *extra]),
        "volumes": len(rows),
        "wall_s": round(wall, 2),
        "volumes_per_s": round(len(rows) / wall, 3),
        "steady_volumes_per_s": round((len(rows) - 1) / span, 3) if span > 0 else None,
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
        "infer_ms_p50": round(float(np.median([r.infer_ms or 0.0 for r in rows])), 1),
        "backends": sorted({f"{r.backend}/{r.device}/{r.precision}" for r in rows}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=64, help="demo phantoms to write (without --inputs)")
    parser.add_argument("--inputs", type=Path, help="a folder of volumes instead of phantoms")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run, comma-separated")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("run_args", nargs="*", help="after --: more ldseg-run options (e.g. --bundle DIR)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ldseg-cohort-") as tmp:
        inputs = args.inputs or Path(tmp) / "in"
        if args.inputs is None:
            _phantoms(inputs, args.volumes)
        first = sorted(p for p in inputs.iterdir() if not p.name.startswith("."))[0]
        # Warm the artifact cache (an export, OpenVINO's compiled models) so that no timed run pays for it.
        subprocess.run([str(BIN / "ldseg-run"), str(first), "-o", str(Path(tmp) / "warm"), *args.run_args], check=True,
                       capture_output=True)  # fmt: skip
        runs = [_run("local", inputs, Path(tmp) / "local", args.run_args)]
        for n in map(int, args.workers.split(",")):
            ray_args = ["--engine", "ray", "--workers", str(n), *args.run_args]
            runs.append(_run(f"ray, {n} worker{'s' if n > 1 else ''}", inputs, Path(tmp) / f"ray{n}", ray_args))
    local = runs[0]
    for run in runs[1:]:
        run["overhead_per_volume_s"] = round((run["wall_s"] - local["wall_s"]) / run["volumes"], 4)  # type: ignore[operator]
        run["overhead_vs_local"] = round(run["wall_s"] / local["wall_s"] - 1, 3)  # type: ignore[operator]
        if run["steady_volumes_per_s"] and local["steady_volumes_per_s"]:
            ratio = local["steady_volumes_per_s"] / run["steady_volumes_per_s"] - 1  # type: ignore[operator]
            run["steady_overhead_vs_local"] = round(ratio, 3)
    args.output.mkdir(parents=True, exist_ok=True)
    volumes = runs[0]["volumes"]
    source = str(args.inputs or "demo phantoms")
    result = {"machine": machine_info(), "volumes": volumes, "inputs": source, "runs": runs}
    (args.output / "cohort.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Cohort throughput: {volumes} volumes ({result['inputs']}), `python benchmarks/cohort_ray.py "
        f"{' '.join(sys.argv[1:])}`",
        "",
        "| engine | wall s | volumes/s | steady volumes/s | overhead vs local (wall) | steady overhead | "
        "latency p50 / p95 s | model ms p50 | backend |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        lines.append(
            f"| {run['engine']} | {run['wall_s']} | {run['volumes_per_s']} | {run['steady_volumes_per_s']} | "
            f"{run.get('overhead_vs_local', '—')} | {run.get('steady_overhead_vs_local', '—')} | "
            f"{run['latency_p50_s']} / {run['latency_p95_s']} | {run['infer_ms_p50']} | {', '.join(run['backends'])} |"  # type: ignore[arg-type]
        )
    (args.output / "cohort.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
