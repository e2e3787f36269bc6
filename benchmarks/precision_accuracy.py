"""Accuracy of each CPU precision on held-out volumes: Dice against the label and against FP32, and
the share of voxels identical to FP32, on the input grid (what `ldseg-run` writes).

    python benchmarks/precision_accuracy.py --checkpoint knee3d.safetensors --bundle knee3d-fp32 \
        [--int8-bundle knee3d-int8] --data ../shared/data/knee --cases case4 -o results/knee3d-openvino

Rows: torch FP32 (the reference), onnxruntime FP32, openvino FP32 / BF16 / INT8 (INT8 where a
calibrated bundle is given; BF16 where the CPU has it). Writes accuracy.json and accuracy.md.
Each row's wall time of one run (first run after a warm-up) is recorded with `uptime`'s load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from ldseg.errors import BackendUnavailable
from ldseg.io.nifti import read_label_volume
from ldseg.metrics import dice_per_class
from ldseg.runs.inference import segment_prepared
from ldseg.runs.types import RunOptions
from ldseg.runs.volumes import prepare
from ldseg.runtime.artifacts.bundle import load_bundle
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import Backend


def _backends(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(row name, factory) in the order measured; factories import lazily."""
    from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend
    from ldseg.runtime.backends.openvino.backend import OpenVinoBackend
    from ldseg.runtime.backends.torch.backend import TorchBackend

    fp32 = load_bundle(args.bundle)
    rows: list[tuple[str, Any]] = [
        ("torch/fp32", lambda: TorchBackend(load_model(args.checkpoint))),
        ("onnxruntime/fp32", lambda: OnnxRuntimeBackend(fp32, threads=args.threads)),
        ("openvino/fp32", lambda: OpenVinoBackend(fp32, "fp32", threads=args.threads)),
        ("openvino/bf16", lambda: OpenVinoBackend(fp32, "bf16", threads=args.threads)),
    ]
    if args.int8_bundle:
        int8 = load_bundle(args.int8_bundle)
        rows.append(("openvino/int8", lambda: OpenVinoBackend(int8, "int8", threads=args.threads)))
        if args.with_onnxruntime_int8:
            rows.append(("onnxruntime/int8", lambda: OnnxRuntimeBackend(int8, threads=args.threads)))
    return [row for row in rows if row[0] in args.rows or not args.rows]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="FP32 bundle of the checkpoint")
    parser.add_argument("--int8-bundle", type=Path)
    parser.add_argument("--with-onnxruntime-int8", action="store_true")
    parser.add_argument("--data", type=Path, required=True, help="folder with images/ and labels/")
    parser.add_argument("--cases", nargs="+", required=True, help="held-out case names, e.g. case4")
    parser.add_argument("--rows", nargs="*", default=[], help="only these rows (default all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cfg = load_bundle(args.bundle).config
    opts = RunOptions()  # 15 DDIM steps (the checkpoint's), seed 0, K = 1, as ldseg-run
    prepared = {c: prepare(args.data / "images" / f"{c}.nii.gz", cfg) for c in args.cases}
    truth = {c: read_label_volume(args.data / "labels" / f"{c}.nii.gz").array for c in args.cases}
    rows: list[dict[str, Any]] = []
    fp32_labels: dict[str, np.ndarray] = {}
    for name, make in _backends(args):
        try:
            backend: Backend = make()
        except BackendUnavailable as exc:
            rows.append({"row": name, "skipped": str(exc)})
            print(f"{name}: skipped ({exc})", flush=True)
            continue
        for case in args.cases:
            segment_prepared(prepared[case], backend, cfg, opts)  # warm-up (compiles, allocates)
            load = _uptime()
            start = time.perf_counter()
            outputs, stage_ms = segment_prepared(prepared[case], backend, cfg, opts)
            seconds = time.perf_counter() - start
            labels = outputs["_seg"][0]
            if name == "torch/fp32":
                fp32_labels[case] = labels
            ref = fp32_labels[case]
            row = {
                "row": name,
                "case": case,
                "seconds": seconds,
                "stage_ms": stage_ms,
                "uptime": load,
                "dice_vs_label": {str(k): v for k, v in dice_per_class(labels, truth[case], cfg.num_classes).items()},
                "dice_vs_fp32": {str(k): v for k, v in dice_per_class(labels, ref, cfg.num_classes).items()},
                "identical_to_fp32_percent": float((labels == ref).mean() * 100),
                "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        backend.close()
    args.output.mkdir(parents=True, exist_ok=True)
    result = {
        "checkpoint": str(args.checkpoint),
        "bundle": str(args.bundle),
        "int8_bundle": str(args.int8_bundle),
        "cases": args.cases,
        "threads": args.threads,
        "rows": rows,
    }
    (args.output / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output / "accuracy.md").write_text(render(result))
    print(render(result))


def render(result: dict[str, Any]) -> str:
    lines = [
        "| precision | case | Dice vs label (1 / 2) | Dice vs FP32 (1 / 2) | identical to FP32 | one run s | load |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['row']} | – | skipped: {r['skipped']} | | | | |")
            continue
        label = " / ".join(f"{v:.4f}" for v in r["dice_vs_label"].values())
        fp32 = " / ".join(f"{v:.4f}" for v in r["dice_vs_fp32"].values())
        load = r["uptime"].split("load average:")[-1].strip()
        lines.append(
            f"| {r['row']} | {r['case']} | {label} | {fp32} | {r['identical_to_fp32_percent']:.3f} % "
            f"| {r['seconds']:.2f} | {load} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
