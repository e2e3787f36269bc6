"""Issue 24's measurements: how much of a whole `ldseg-run` is the model. Not a test: it prints and
writes what it measured (JSON and a markdown table).

    python benchmarks/startup.py --checkpoint work/knee/knee3d.safetensors \
        --images ../shared/data/knee/images --case case4 --precision bf16 --runs 5 \
        -o benchmarks/results/<machine>/startup

- import: `import ldseg.cli.run, ldseg.api` (the run path) in a fresh process, median of --runs;
- single: a cold `ldseg-run` of one volume on the cached bundle, one process per run: process wall
  time against the model's own stage time from the run manifest (encoder + loop + decoder + copies);
- folder: one `ldseg-run` over 8 volumes (the cases repeated through links): wall per volume against
  the median stage time.
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
from pathlib import Path

BIN = Path(sys.executable).parent
IMPORT = "import time; t = time.perf_counter(); import ldseg.cli.run, ldseg.api; print(time.perf_counter() - t)"
MODEL_STAGES = ("input_copy", "encoder", "loop", "decoder", "output_copy", "graph")


def load_average() -> float:
    return os.getloadavg()[0]


def import_seconds(runs: int) -> list[float]:
    env = {**os.environ, "PYTHONUTF8": "1"}
    out = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True, check=True, env=env)
        out.append(float(done.stdout.strip()))
    return out


def ldseg_run(args: list[str]) -> float:
    env = {**os.environ, "PYTHONUTF8": "1"}
    clock = time.perf_counter()
    done = subprocess.run([str(BIN / "ldseg-run"), *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - clock
    if done.returncode != 0:
        raise SystemExit(f"ldseg-run failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall


def manifest_rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "ldseg-run.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row["status"] == "ok"]


def stage_ms(row: dict[str, str]) -> float:
    stages = json.loads(row["stages"])
    return sum(float(stages[s]) for s in MODEL_STAGES if s in stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--case", default="case4")
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    model = ["--checkpoint", args.checkpoint, "--backend", args.backend, "--precision", args.precision]
    case = args.images / f"{args.case}.nii.gz"
    record: dict[str, object] = {"command": " ".join(sys.argv), "load_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ldseg_run([str(case), "-o", str(root / "warm"), *model])  # fills the artifact and compiled-model caches
        record["import_s"] = import_seconds(args.runs)
        singles = []
        for i in range(args.runs):
            out = root / f"single{i}"
            wall = ldseg_run([str(case), "-o", str(out), *model])
            [row] = manifest_rows(out)
            singles.append(
                {
                    "wall_s": wall,
                    "stages_s": stage_ms(row) / 1e3,
                    "read_s": float(row["read_ms"]) / 1e3,
                    "infer_s": float(row["infer_ms"]) / 1e3,
                    "write_s": float(row["write_ms"]) / 1e3,
                    "seconds": float(row["seconds"]),
                }
            )
        record["single"] = singles
        folder = root / "folder"
        folder.mkdir()
        cases = sorted(args.images.glob("case*.nii.gz"))
        for i in range(8):
            (folder / f"v{i}.nii.gz").symlink_to(cases[i % len(cases)].resolve())
        wall = ldseg_run([str(folder), "-o", str(root / "folder-out"), *model])
        rows = manifest_rows(root / "folder-out")
        record["folder"] = {
            "volumes": len(rows),
            "wall_s": wall,
            "per_volume_s": wall / len(rows),
            "median_stages_s": statistics.median(stage_ms(r) for r in rows) / 1e3,
        }
    record["load_after"] = load_average()
    single_wall = statistics.median(s["wall_s"] for s in singles)
    single_stages = statistics.median(s["stages_s"] for s in singles)
    folder_rec = record["folder"]
    assert isinstance(folder_rec, dict)
    record["summary"] = {
        "import_s_median": statistics.median(record["import_s"]),  # type: ignore[arg-type]
        "single_wall_s": single_wall,
        "single_stages_s": single_stages,
        "single_ratio": single_wall / single_stages,
        "folder_per_volume_s": folder_rec["per_volume_s"],
        "folder_ratio": folder_rec["per_volume_s"] / folder_rec["median_stages_s"],
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "startup.json").write_text(json.dumps(record, indent=2))
    s = record["summary"]
    assert isinstance(s, dict)
    lines = [
        f"`{record['command']}` (load {record['load_before']:.2f} before, {record['load_after']:.2f} after)",
        "",
        "| what | seconds | vs model stages |",
        "| --- | --- | --- |",
        f"| import of the run path (fresh process, median of {args.runs}) | {s['import_s_median']:.3f} | |",
        f"| cold `ldseg-run`, one volume (median of {args.runs}) | {s['single_wall_s']:.2f} | "
        f"{s['single_ratio']:.2f}x of {s['single_stages_s']:.2f} |",
        f"| folder of 8, per volume | {s['folder_per_volume_s']:.2f} | "
        f"{s['folder_ratio']:.2f}x of {folder_rec['median_stages_s']:.2f} |",
    ]
    (args.output / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
