"""Issue 24's measurements: how much of a whole `ldseg-run` is the model. Not a test: it prints and
writes what it measured (JSON and a markdown table).

    python benchmarks/startup.py --checkpoint work/knee/knee3d.safetensors \
        --images ../shared/data/knee/images --case case4 --precision bf16 --runs 5 \
        -o benchmarks/results/<machine>/startup

- import: `import ldseg.cli.run, ldseg.api` (the run path) in a fresh process, median of --runs; and
  the same with the --backend's module (`ldseg.runtime.backends.<backend>.backend`), which the run
  path imports only once it has chosen that backend;
- single: a cold `ldseg-run` of one volume on the cached bundle, one process per run: process wall
  time against the model's own stage time from the run manifest (encoder + loop + decoder + copies),
  and where the rest goes (`phases`: before the read started, in the run outside the model, after
  the manifest row), placed by the row's own clock;
- folder: one `ldseg-run` over --folder volumes (default 8; the cases repeated through links): wall
  per volume against the median stage time (0 leaves it out).
`--bundle DIR` runs an exported bundle instead of a checkpoint (with --trust-unvalidated: a bundle
exported with --no-validate serves for timing). `--baseline DIR` measures another checkout (e.g. main)
alternately with this one, import and single runs interleaved, so a busy machine slows both alike.
A first, unmeasured run fills the artifact cache (export) and OpenVINO's compiled-model cache.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parents[1]  # the tree whose ldseg is measured (PYTHONPATH of each process)
IMPORT = "import time; t = time.perf_counter(); import ldseg.cli.run, ldseg.api{}; print(time.perf_counter() - t)"
PHASES = ("before_read_s", "run_outside_model_s", "after_row_s")
MODEL_STAGES = ("input_copy", "encoder", "loop", "decoder", "output_copy", "graph")


def load_average() -> float:
    return os.getloadavg()[0]


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONUTF8": "1", "PYTHONPATH": str(tree)}


def import_seconds(tree: Path, backend: str | None = None) -> float:
    code = IMPORT.format("" if backend is None else f", ldseg.runtime.backends.{backend}.backend")
    # cwd too: `python -c` puts the current folder first on sys.path, before PYTHONPATH.
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env(tree), cwd=tree
    )
    return float(done.stdout.strip())


def ldseg_run(args: list[str], tree: Path) -> tuple[float, float]:
    """The process's wall time, and the epoch it started at (to place the manifest's times in it)."""
    # The console script where ldseg is installed; its entry point where the tree is only on PYTHONPATH (a GPU call).
    script = BIN / "ldseg-run"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from ldseg.cli.run import main; main()"]
    spawned, clock = time.time(), time.perf_counter()
    done = subprocess.run([*command, *args], capture_output=True, text=True, env=_env(tree), cwd=tree)
    wall = time.perf_counter() - clock
    if done.returncode != 0:
        raise SystemExit(f"ldseg-run failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, spawned


def phases(row: dict[str, str], wall: float, spawned: float, stages_s: float) -> dict[str, float]:
    """Where a one-volume process's time goes, from its manifest row: before the input's read started
    (interpreter, imports, options), the run outside the model (the backend's making beyond the read
    it overlaps, the read, resampling, writing), and after the row was written (summary, teardown)."""
    finished = datetime.fromisoformat(row["finished"]).timestamp()
    seconds = float(row["seconds"])  # from the read's start to the row
    return {
        "before_read_s": finished - seconds - spawned,
        "run_outside_model_s": seconds - stages_s,
        "after_row_s": spawned + wall - finished,
    }


def manifest_rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "ldseg-run.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row["status"] == "ok"]


def stage_ms(row: dict[str, str]) -> float:
    stages = json.loads(row["stages"])
    return sum(float(stages[s]) for s in MODEL_STAGES if s in stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint")
    source.add_argument("--bundle")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--case", default="case4")
    parser.add_argument("--backend", default="openvino", help="auto: ldseg-run's own choice, as a user runs it")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto", help="ldseg-run's --device (cuda: issue 30's cold command)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--folder", type=int, default=8, help="volumes of the folder run (0: none)")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured alternately with this one")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    # Absolute paths: each run starts in its tree (ldseg_run's cwd).
    named = (
        ["--checkpoint", str(Path(args.checkpoint).resolve())]
        if args.checkpoint
        else ["--bundle", str(Path(args.bundle).resolve()), "--trust-unvalidated"]
    )
    model = [*named, "--backend", args.backend, "--precision", args.precision, "--device", args.device]
    case = (args.images / f"{args.case}.nii.gz").resolve()
    # Every measurement alternates between the trees (this one, then --baseline), so that a busy
    # machine slows both alike and their ratio stays comparable.
    trees = {"this": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    record: dict[str, Any] = {"command": " ".join(sys.argv), "load_before": load_average(), "trees": {}}
    results: dict[str, dict[str, Any]] = {
        name: {"import_s": [], "backend_import_s": [], "single": []} for name in trees
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ldseg_run([str(case), "-o", str(root / "warm"), *model], HERE)  # fills the artifact and compiled-model caches
        for i in range(args.runs):
            for name, tree in trees.items():
                results[name]["import_s"].append(import_seconds(tree))
                if args.backend != "auto":  # auto's module is known only once the run has chosen
                    results[name]["backend_import_s"].append(import_seconds(tree, args.backend))
                out = root / f"{name}-single{i}"
                wall, spawned = ldseg_run([str(case), "-o", str(out), *model], tree)
                [row] = manifest_rows(out)
                stages_s = stage_ms(row) / 1e3
                results[name]["single"].append(
                    {
                        "wall_s": wall,
                        "stages_s": stages_s,
                        "read_s": float(row["read_ms"]) / 1e3,
                        "infer_s": float(row["infer_ms"]) / 1e3,
                        "write_s": float(row["write_ms"]) / 1e3,
                        "seconds": float(row["seconds"]),
                        **phases(row, wall, spawned, stages_s),
                    }
                )
        if args.folder:
            folder = root / "folder"
            folder.mkdir()
            cases = sorted(args.images.glob("case*.nii.gz"))
            for i in range(args.folder):
                (folder / f"v{i}.nii.gz").symlink_to(cases[i % len(cases)].resolve())
            wall, _ = ldseg_run([str(folder), "-o", str(root / "folder-out"), *model], HERE)
            rows = manifest_rows(root / "folder-out")
            results["this"]["folder"] = {
                "volumes": len(rows),
                "wall_s": wall,
                "per_volume_s": wall / len(rows),
                "median_stages_s": statistics.median(stage_ms(r) for r in rows) / 1e3,
            }
    record["load_after"] = load_average()
    lines = [
        f"`{record['command']}` (load {record['load_before']:.2f} before, {record['load_after']:.2f} after)",
        "",
        "| tree | what | seconds | vs model stages |",
        "| --- | --- | --- | --- |",
    ]
    for name, res in results.items():
        singles = res["single"]
        wall = statistics.median(s["wall_s"] for s in singles)
        stages = statistics.median(s["stages_s"] for s in singles)
        res["summary"] = {
            "import_s_median": statistics.median(res["import_s"]),
            "backend_import_s_median": statistics.median(res["backend_import_s"]) if res["backend_import_s"] else None,
            "single_wall_s": wall,
            "single_stages_s": stages,
            "single_ratio": statistics.median(s["wall_s"] / s["stages_s"] for s in singles),
        }
        summary = res["summary"]
        lines.append(
            f"| {name} | import of the run path (fresh process, median of {args.runs}) | "
            f"{summary['import_s_median']:.3f} | |"
        )
        if summary["backend_import_s_median"] is not None:
            lines.append(
                f"| {name} | the same and the {args.backend} backend's module | "
                f"{summary['backend_import_s_median']:.3f} | |"
            )
        lines += [
            f"| {name} | cold `ldseg-run`, one volume (median of {args.runs}; ratio: median of the runs' ratios) | "
            f"{wall:.2f} | {summary['single_ratio']:.2f}x of {stages:.2f} |",
            f"| {name} | of which: before the read started / in the run outside the model / after the row "
            f"(medians) | {' / '.join(f'{statistics.median(s[p] for s in singles):.2f}' for p in PHASES)} | |",
        ]
        if "folder" in res:
            folder_rec = res["folder"]
            summary["folder_per_volume_s"] = folder_rec["per_volume_s"]
            summary["folder_ratio"] = folder_rec["per_volume_s"] / folder_rec["median_stages_s"]
            lines.append(
                f"| {name} | folder of {folder_rec['volumes']}, per volume | {folder_rec['per_volume_s']:.2f} | "
                f"{summary['folder_ratio']:.2f}x of {folder_rec['median_stages_s']:.2f} |"
            )
        record["trees"][name] = {"path": str(trees[name]), **res}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "startup.json").write_text(json.dumps(record, indent=2))
    (args.output / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
