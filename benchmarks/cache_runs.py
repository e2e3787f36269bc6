"""Issue 14's measurements: `ldseg-run --checkpoint` through the artifact cache against `--bundle`, and
the Python API on many small volumes. Not a test: it prints and writes what it measured.

    # end to end, one process per run: the first run exports (its cost on its own line), later runs
    # reuse the cache; --bundle runs the very same cached bundle. Runs alternate to share the load.
    python benchmarks/cache_runs.py cli --checkpoint work/knee/knee3d.safetensors \
        --input ../shared/data/knee/images/case4.nii.gz --runs 3 -o benchmarks/results/<machine>/cache
    # one process, one Segmenter: model and sessions load once, then N volumes
    python benchmarks/cache_runs.py api --checkpoint demo --volumes 100 -o benchmarks/results/<machine>/cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _machine() -> dict[str, object]:
    import psutil

    names = (
        [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        if Path("/proc/cpuinfo").is_file()
        else []
    )
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def _timed(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    clock = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - clock
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return seconds, done.stderr


def cli(opts: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="cache-bench-", dir=opts.work))
    env = {**os.environ, "LDSEG_CACHE": str(work / "cache"), "COLUMNS": "10000"}
    run = [str(BIN / "ldseg-run"), str(opts.input)]
    first_s, log = _timed([*run, "--checkpoint", opts.checkpoint, "-o", str(work / "first")], env)
    built = re.search(r"^cached (\S+) \(([\d.]+) s\); later runs reuse it$", log, re.M)
    if built is None:
        raise SystemExit(f"the first run did not export into the cache:\n{log}")
    bundle, export_s = built.group(1), float(built.group(2))
    print(f"first run (export + validation, then segmentation): {first_s:.1f} s wall")
    print(f"first-run export cost: {export_s:.1f} s (exported and validated into {bundle})")
    times: dict[str, list[float]] = {"checkpoint": [], "bundle": []}
    for i in range(opts.runs):  # alternate, so that both see the same load on a shared machine
        for name, source in (("checkpoint", ["--checkpoint", opts.checkpoint]), ("bundle", ["--bundle", bundle])):
            seconds, log = _timed([*run, *source, "-o", str(work / f"{name}{i}")], env)
            assert "backend: onnxruntime" in log, log
            if name == "checkpoint":
                assert "cached: " in log and "first use" not in log, log
            times[name].append(seconds)
            print(f"run {i + 1}: --{name} {seconds:.1f} s")
    ckpt, bndl = statistics.median(times["checkpoint"]), statistics.median(times["bundle"])
    print(f"median end to end: --checkpoint (cached) {ckpt:.1f} s, --bundle {bndl:.1f} s, ratio {ckpt / bndl:.3f}")
    return {
        "kind": "cli",
        "checkpoint": opts.checkpoint,
        "input": str(opts.input),
        "first_run_s": round(first_s, 2),
        "export_s": export_s,
        "checkpoint_runs_s": [round(t, 2) for t in times["checkpoint"]],
        "bundle_runs_s": [round(t, 2) for t in times["bundle"]],
        "median_checkpoint_s": round(ckpt, 2),
        "median_bundle_s": round(bndl, 2),
        "ratio": round(ckpt / bndl, 3),
    }


def api(opts: argparse.Namespace) -> dict[str, object]:
    import onnxruntime

    import ldseg
    from ldseg.data.phantoms import make_phantom, write_phantom_nifti
    from ldseg.runtime import select

    work = Path(tempfile.mkdtemp(prefix="api-bench-", dir=opts.work))
    cache = work / "cache"
    with ldseg.Segmenter(opts.checkpoint, cache=cache, warn_demo=False):  # fills the cache (not timed)
        pass
    inputs = work / "in"
    inputs.mkdir()
    for seed in range(opts.volumes):  # unseen phantom seeds on the demo grid
        write_phantom_nifti(
            make_phantom(2000 + seed, (32, 64, 64)),
            inputs / f"v{seed:03d}.nii.gz",
            work / f"truth{seed:03d}.nii.gz",
            overwrite=False,
        )
    counts = {"checkpoint loads": 0, "onnxruntime sessions": 0}
    real_load, real_session = select.load_checkpoint, onnxruntime.InferenceSession

    def load(path):  # type: ignore[no-untyped-def]
        counts["checkpoint loads"] += 1
        return real_load(path)

    def session(*args, **kwargs):  # type: ignore[no-untyped-def]
        counts["onnxruntime sessions"] += 1
        return real_session(*args, **kwargs)

    select.load_checkpoint = load  # type: ignore[assignment]
    onnxruntime.InferenceSession = session  # type: ignore[misc]
    clock = time.perf_counter()
    with ldseg.Segmenter(opts.checkpoint, cache=cache, warn_demo=False) as seg:
        open_s = time.perf_counter() - clock
        clock = time.perf_counter()
        summary = seg.write(inputs, work / "out")
        run_s = time.perf_counter() - clock
        backend = f"{seg.backend.name}/{seg.backend.device}/{seg.backend.precision}"
    assert not summary.failures and summary.volumes == opts.volumes
    rate = opts.volumes / run_s
    print(
        f"{backend}: Segmenter opened in {open_s:.2f} s ({counts['checkpoint loads']} checkpoint load, "
        f"{counts['onnxruntime sessions']} ONNX Runtime sessions); {opts.volumes} volumes written in {run_s:.1f} s "
        f"= {rate:.2f} volumes/s (read, preprocess, 15-step sampling, resample, write)"
    )
    return {
        "kind": "api",
        "checkpoint": opts.checkpoint,
        "backend": backend,
        "volumes": opts.volumes,
        "open_s": round(open_s, 3),
        "run_s": round(run_s, 2),
        "volumes_per_s": round(rate, 3),
        **counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("cli", "api"))
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--input", type=Path, help="cli: the volume to segment")
    parser.add_argument("--runs", type=int, default=3, help="cli: cached --checkpoint and --bundle runs each")
    parser.add_argument("--volumes", type=int, default=100, help="api: phantoms through one Segmenter")
    parser.add_argument("--work", type=Path, default=Path("work"), help="scratch folder (caches, outputs)")
    parser.add_argument("-o", "--output", type=Path, help="results folder (writes <kind>-<name>.json)")
    parser.add_argument("--name", default="run")
    opts = parser.parse_args()
    opts.work.mkdir(parents=True, exist_ok=True)
    machine = _machine()
    result = cli(opts) if opts.kind == "cli" else api(opts)
    result.update(
        machine=machine,
        load_average_at_end=[round(x, 2) for x in os.getloadavg()],
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    print(json.dumps(result, indent=2))
    if opts.output is not None:
        opts.output.mkdir(parents=True, exist_ok=True)
        (opts.output / f"{opts.kind}-{opts.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
