"""Summary of benchmarks/k_samples_knee.sh: peak RSS and wall per run (/usr/bin/time -v), the
stage times the run manifest records, the wall-time target of issue 26 and the K=1 label check.

Target per backend: the K=8 run's infer_ms <= encoder + 8 x decoder + loop, with the encoder and
decoder of the K=1 run of the same backend (one image, one sample) and the loop of the K=8 run.

    python benchmarks/k_samples_summary.py --work WORK --out OUT --backends openvino onnxruntime torch
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np

RSS_LIMIT_GB = 4.0  # compared with GiB (time -v kbytes are KiB / 2**20); 4 GiB = 4.29 GB


def time_v(path: Path) -> dict[str, float]:
    text = path.read_text()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))  # type: ignore[union-attr]
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)  # type: ignore[union-attr]
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    status = int(re.search(r"Exit status: (\d+)", text).group(1))  # type: ignore[union-attr]
    return {"peak_rss_gb": rss / 2**20, "wall_s": seconds, "exit_status": status}


def manifest(path: Path) -> dict[str, object]:
    with path.open() as f:
        row = next(r for r in csv.DictReader(f) if r["status"] == "ok")
    return {"infer_ms": float(row["infer_ms"]), "stages": json.loads(row["stages"]), "seconds": float(row["seconds"])}


def seg(folder: Path) -> np.ndarray:
    (path,) = folder.glob("*_seg.nii.gz")
    return np.asarray(nib.load(str(path)).dataobj)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backends", nargs="+", required=True)
    args = parser.parse_args()
    rows, lines = (
        {},
        [
            "| backend | K | exit | peak RSS (GiB) | wall (s) | infer_ms | encoder | loop | decoder (sum) | "
            "target: enc1 + 8 x dec1 + loop8 (ms) | within | K=1 labels = reference |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ],
    )
    for backend in args.backends:
        one, eight = (f"{backend}-k{k}" for k in (1, 8))
        runs = {
            k: {**time_v(args.out / f"{n}.time"), **manifest(args.out / f"{n}.manifest.csv")}
            for k, n in ((1, one), (8, eight))
        }
        s1, s8 = runs[1]["stages"], runs[8]["stages"]
        target = s1["encoder"] + 8 * s1["decoder"] + s8["loop"]  # type: ignore[index]
        reference = args.work / f"{backend}-k1-reference"
        same = bool(np.array_equal(seg(args.work / one), seg(reference))) if reference.is_dir() else None
        rows[backend] = {"runs": runs, "target_ms": target, "labels_k1_identical_to_reference": same}
        for k, run in runs.items():
            st = run["stages"]
            within = "" if k == 1 else ("yes" if run["infer_ms"] <= target else "no")  # type: ignore[operator]
            lines.append(
                f"| {backend} | {k} | {run['exit_status']} | {run['peak_rss_gb']:.2f} | {run['wall_s']:.1f} | "
                f"{run['infer_ms']:.0f} | {st['encoder']:.0f} | {st['loop']:.0f} | {st['decoder']:.0f} | "  # type: ignore[index]
                f"{'' if k == 1 else f'{target:.0f}'} | {within} | {'' if k == 8 else same} |"
            )
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    over = [b for b, r in rows.items() if r["runs"][8]["peak_rss_gb"] > RSS_LIMIT_GB]
    print(f"peak RSS over {RSS_LIMIT_GB} GB at K=8: {over or 'none'}")


if __name__ == "__main__":
    main()
