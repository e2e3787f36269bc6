"""ldseg-serve latency and throughput against in-process Segmenter.segment and ldseg-run.

    python benchmarks/serve_latency.py sequential --checkpoint knee3d.safetensors --precision bf16 \\
        --images case4.nii.gz --repeats 8 -o benchmarks/results/<machine>-<date>/serve
    python benchmarks/serve_latency.py concurrent --checkpoint knee3d.safetensors --precision bf16 \\
        --images case1.nii.gz case2.nii.gz case3.nii.gz case4.nii.gz --clients 4 -o .../serve
    python benchmarks/serve_latency.py concurrent --phantoms 16 --clients 16 --per-client 8 -o .../serve  # demo model

sequential: one client, one request after another. First in this process, `Segmenter.segment`
(the model and resampling, no file written), then the same volumes as HTTP requests to a fresh
ldseg-serve (one replica): body upload, reading, model, resampling, NIfTI encoding, response.
Latency is per request, first (warm-up) request of each left out; the ratio is server/in-process.

concurrent: `--clients` threads each send `--per-client` requests (the volumes in turn) to one
replica; throughput is requests per second of wall time, latency per request. With `--images`,
the same volumes also go through `ldseg-run` on a folder (a fresh process, as a user runs it; the
artifact cache is warm), for volumes/s against the server's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from ldseg.bench.machine import machine_info
from ldseg.runs.specs import ModelSpec

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)} | {
        "mean_ms": round(float(ms.mean()), 1),
        "n": len(seconds),
    }


def _phantoms(folder: Path, count: int) -> list[Path]:
    from ldseg.data.phantoms import make_phantom, write_phantom_nifti

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"p{seed:03d}.nii.gz"
        write_phantom_nifti(make_phantom(seed, (32, 64, 64), 3), path, folder / "truth.nii.gz", overwrite=True)
        paths.append(path)
    (folder / "truth.nii.gz").unlink()
    return paths


def _model(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(args.checkpoint, precision=args.precision)


def _serve(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from ldseg.serve.config import ServeConfig
    from ldseg.serve.launch import start

    config = ServeConfig(model=_model(args), port=_port(), max_batch=args.max_batch, max_queued=64)
    return config, start(config, log_to_driver=False)


def _post(url: str, body: bytes) -> tuple[float, int]:
    clock = time.perf_counter()
    answer = requests.post(url + "/v1/segment", data=body, timeout=600)
    _ = answer.content
    return time.perf_counter() - clock, answer.status_code


def sequential(args: argparse.Namespace) -> dict[str, Any]:
    import ldseg

    images = [Path(p) for p in args.images]
    local: list[float] = []
    with ldseg.Segmenter(checkpoint=args.checkpoint, precision=args.precision, warn_demo=False) as seg:
        chosen = f"{seg.backend.name} {seg.backend.device} {seg.backend.precision}"
        seg.segment(images[0])  # warm-up
        for k in range(args.repeats):
            clock = time.perf_counter()
            seg.segment(images[k % len(images)])
            local.append(time.perf_counter() - clock)
    from ldseg.serve.launch import stop

    config, health = _serve(args)
    try:
        bodies = [p.read_bytes() for p in images]
        _post(config.url, bodies[0])  # the first request after start (connection, caches)
        served = []
        for k in range(args.repeats):
            seconds, status = _post(config.url, bodies[k % len(bodies)])
            assert status == 200, status
            served.append(seconds)
    finally:
        stop()
    local_s, server_s = _stats(local), _stats(served)
    return {
        "mode": "sequential",
        "images": [p.name for p in images],
        "backend": chosen,
        "server_backend": f"{health['backend']} {health['device']} {health['precision']}",
        "in_process_segment": local_s,
        "server_request": server_s,
        "ratio_p50": round(server_s["p50_ms"] / local_s["p50_ms"], 3),
        "ratio_p95": round(server_s["p95_ms"] / local_s["p95_ms"], 3),
    }


def _ldseg_run(args: argparse.Namespace, images: list[Path]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ldseg-bench-") as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for k in range(args.clients * args.per_client):  # the same requests, as files
            src = images[k % len(images)]
            os.symlink(src.resolve(), folder / f"v{k:03d}_{src.name}")
        command = [str(BIN / "ldseg-run"), str(folder), "-o", str(Path(tmp) / "out")]
        command += ["--checkpoint", args.checkpoint, "--precision", args.precision]
        clock = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - clock
        if done.returncode != 0:
            raise SystemExit(f"ldseg-run failed: {done.stderr[-2000:]}")
        count = len(list(folder.iterdir()))
    shown = " ".join(["ldseg-run", "FOLDER", "-o", "OUT", *command[4:]])
    return {"command": shown, "volumes": count, "wall_s": round(wall, 2), "volumes_per_s": round(count / wall, 3)}


def concurrent(args: argparse.Namespace) -> dict[str, Any]:
    from ldseg.serve.launch import stop

    with tempfile.TemporaryDirectory(prefix="ldseg-bench-") as tmp:
        images = [Path(p) for p in args.images] if args.images else _phantoms(Path(tmp) / "p", args.phantoms)
        bodies = [p.read_bytes() for p in images]
        config, health = _serve(args)
        try:
            for body in bodies[: args.clients]:
                _post(config.url, body)  # warm-up, not counted

            def client(c: int) -> list[tuple[float, int]]:
                return [_post(config.url, bodies[(c + k) % len(bodies)]) for k in range(args.per_client)]

            clock = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
            wall = time.perf_counter() - clock
        finally:
            stop()
        errors = [s for _, s in results if s != 200]
        report: dict[str, Any] = {
            "mode": "concurrent",
            "clients": args.clients,
            "requests": len(results),
            "errors": len(errors),
            "error_statuses": sorted(set(errors)),
            "images": [p.name for p in images] if args.images else f"{len(images)} demo phantoms",
            "server_backend": f"{health['backend']} {health['device']} {health['precision']}",
            "max_batch": args.max_batch,
            "wall_s": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 3),
            "latency": _stats([s for s, _ in results]),
        }
        if args.images:
            report["ldseg_run_folder"] = _ldseg_run(args, images)
            report["server_vs_ldseg_run_throughput"] = round(
                report["requests_per_s"] / report["ldseg_run_folder"]["volumes_per_s"], 3
            )
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["sequential", "concurrent"])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--images", nargs="*", default=[])
    parser.add_argument("--phantoms", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--name", default=None, help="result file stem (default: mode + model)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    if args.mode == "sequential" and not args.images:
        args.images = [str(p) for p in _phantoms(Path(tempfile.mkdtemp(prefix="ldseg-bench-")), 4)]
    load_before = os.getloadavg()
    report = sequential(args) if args.mode == "sequential" else concurrent(args)
    report["load_average_before"] = [round(v, 2) for v in load_before]
    report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    report["command"] = " ".join(["python", "benchmarks/serve_latency.py", *sys.argv[1:]])
    report["machine"] = machine_info()
    args.output.mkdir(parents=True, exist_ok=True)
    model = Path(args.checkpoint).stem if args.checkpoint != "demo" else "demo"
    name = args.name or f"{args.mode}-{model}"
    (args.output / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    shown = {k: v for k, v in report.items() if k != "machine"}
    print(json.dumps(shown, indent=2, default=str))


if __name__ == "__main__":
    main()
