"""gpu_check's command line and the order of its checks (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from ldseg.bench.gpu_check import backend_checks as gpu
from ldseg.bench.gpu_check import volume_checks as volume
from ldseg.bench.gpu_check.prepare import PREPARED, no_gpu_reason, prepare
from ldseg.bench.gpu_check.torch_checks import Checks

BUDGET_S = 420.0  # the whole run, checks and watchdog included (a lent GPU session has minutes)


def run_checks(prepared: Path, out_dir: Path, budget_s: float = BUDGET_S) -> tuple[Path, dict[str, Any]]:
    if not (prepared / "prepared.json").is_file():
        raise SystemExit(
            f"gpu_check: {prepared} is not prepared: run `bash scripts/gpu_check.sh --prepare` on a "
            "CPU machine first (it travels with the working tree)"
        )
    checks = Checks(prepared, out_dir, budget_s)
    checks.report.write()  # a report exists from the first second on
    checks.run("torch_cpu_reference", checks.torch_cpu_reference)
    checks.run("cuda_layer", checks.cuda_layer)
    checks.run("torch_graph", checks.torch_graph)
    checks.run("torch_cuda_agreement", checks.torch_agreement)
    checks.run("torch_broken_capture", checks.torch_broken_capture)
    checks.run("torch_k_samples", checks.torch_k_samples)
    for reduced in ("bf16", "fp16"):
        checks.run(f"torch_{reduced}", lambda p=reduced: checks.torch_reduced(p))  # type: ignore[misc]
    checks.run("device_volume_ops_torch", lambda: volume.device_volume_ops(volume.torch_ops))
    checks.run("onnxruntime_cuda", lambda: gpu.onnxruntime_cuda(checks))
    checks.run("onnxruntime_cuda_graphs", lambda: gpu.onnxruntime_cuda(checks, "graphs"))
    checks.run("onnxruntime_cuda_k_samples", lambda: gpu.onnxruntime_cuda(checks, "k_samples"))
    checks.run("device_volume_ops_onnxruntime", lambda: volume.device_volume_ops(volume.onnxruntime_ops))
    checks.run("tensorrt_fp32", lambda: gpu.tensorrt(checks, "fp32"))
    checks.run("tensorrt_fp32_graphs", lambda: gpu.tensorrt_graphs(checks, "fp32", "graphs"))
    checks.run("tensorrt_fp32_k_samples", lambda: gpu.tensorrt_graphs(checks, "fp32", "k_samples"))
    checks.run("device_volume_ops_tensorrt", lambda: gpu.tensorrt_volume_ops(checks))
    for precision in ("fp16", "int8"):
        checks.run(f"tensorrt_{precision}", lambda p=precision: gpu.tensorrt(checks, p))  # type: ignore[misc]
    checks.run("bench", lambda: gpu.bench(checks))
    # last: a cold compile may take a minute, and the budget then leaves it out, not the others
    checks.run("torch_bf16_compiled", lambda: checks.torch_reduced("bf16", compile=True))
    path = checks.report.write()
    return path, {"summary": checks.report.summary(), "checks": checks.results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description="One GPU verification run (ldseg.bench.gpu_check).")
    parser.add_argument("--prepare", action="store_true", help="CPU side: export bundles, phantoms, wheels")
    parser.add_argument("--no-wheels", action="store_true", help="with --prepare: skip the wheel download")
    parser.add_argument("--prepared", type=Path, default=PREPARED, help="the prepared folder")
    parser.add_argument("--output", type=Path, default=None, help="report folder (default benchmarks/results/...)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's time budget, seconds")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepared, wheels=not args.no_wheels)
        return 0
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu_check: no GPU here ({reason}): nothing checked", file=sys.stderr)
        return 6
    import torch

    slug = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(0).lower()).strip("-")
    out_dir = args.output or Path("benchmarks/results") / f"{slug}-{dt.date.today().isoformat()}"
    path, report = run_checks(args.prepared, out_dir, args.budget_s)
    print(f"gpu_check: {report['summary']} -> {path}")
    return 1 if report["summary"]["fail"] else 0
