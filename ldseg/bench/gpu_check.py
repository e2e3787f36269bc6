"""One GPU verification run: every CUDA/TensorRT path ldseg has, checked in minutes, into one JSON.

    bash scripts/gpu_check.sh --prepare        # on any CPU machine: bundles, phantoms, wheels
    bash scripts/gpu_check.sh [--output DIR]   # on the GPU machine: no network, < 8 minutes

`--prepare` writes a git-ignored folder (default work/gpu-check) that travels with the working
tree: the demo model's FP32, FP16 and INT8 bundles, the phantoms (images + truth, so the GPU
machine needs neither scipy nor nibabel for them) and wheels of small pure dependencies the GPU
machine may lack (scripts/gpu_check.sh installs the missing ones from there, offline).

The run checks, each into the report as pass / fail / "not run: <reason>", with its numbers:
- cuda_layer: ldseg/runtime/backends/tensorrt/cuda.py (cuda-python) captures copies into a graph, relaunches it on
  changed inputs, and a deliberately broken capture ends with a reason and an eager run;
- torch_graph: the whole-pipeline graph replay equals eager for every seed, differs across seeds,
  does not grow allocations over 100 replays, and batch 4 equals 4 x batch 1;
- torch_broken_capture: a capture that syncs falls back to eager, with the reason, same labels;
- agreement of every GPU route with the torch CPU FP32 reference on the phantoms (and Dice vs truth);
- onnxruntime_cuda, tensorrt_fp32/fp16/int8 where importable, else "not run: <reason>";
- bench: `ldseg-bench --device cuda --warmup 0` over what is available.
Without a GPU it prints one line and exits 6 (the "backend unavailable" code).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "ldseg-gpu-check/1"
PREPARED = Path("work/gpu-check")
PHANTOM_SEEDS = (0, 1, 2, 3)  # never seen in training (README: training seeds >= 10000)
BUNDLES = {"fp32": "demo-fp32", "fp16": "demo-fp16", "int8": "demo-int8"}
TARGET_AGREEMENT = {"fp32": 0.999, "fp16": 0.99, "int8": 0.98}  # fraction of voxels equal to the reference
BUDGET_S = 420.0  # checks still pending after this are "not run: time budget" (the run must stay < 8 min)
# Pure (or abi3) wheels the GPU machine may lack; the shell script installs only the missing ones.
WHEELS = (
    "nibabel",
    "packaging",
    "importlib_resources",
    "typing_extensions",
    "safetensors",
    "psutil",
    "typer",
    "click",
    "rich",
    "shellingham",
    "markdown-it-py",
    "mdurl",
    "pygments",
)

Result = dict[str, Any]


def no_gpu_reason() -> str | None:
    """None when some route sees a GPU; else why not, per route (PyTorch, cuda-python)."""
    from ldseg.runtime.backends.tensorrt.cuda import cuda_runtime_problem
    from ldseg.runtime.select import torch_cuda_problem

    torch_problem, runtime_problem = torch_cuda_problem(0), cuda_runtime_problem(0)
    if torch_problem is None or runtime_problem is None:
        return None
    return f"PyTorch: {torch_problem}; cuda-python: {runtime_problem}"


# --------------------------------------------------------------------------- prepare (CPU)


def prepare(folder: Path, wheels: bool = True, log: Callable[[str], None] = print) -> Path:
    """Export the bundles, write the phantoms and fetch the wheels into `folder` (re-runnable)."""
    from ldseg.bench.sources import load_images
    from ldseg.calibration import calibrate
    from ldseg.data.phantoms import make_phantom
    from ldseg.export.exporter import export_bundle
    from ldseg.model.config import get_preset
    from ldseg.runtime.select import demo_checkpoint_path

    folder.mkdir(parents=True, exist_ok=True)
    cfg = get_preset("demo")
    truth = [make_phantom(seed, cfg.image_size, cfg.num_classes).label for seed in PHANTOM_SEEDS]
    images, _, _ = load_images(
        cfg, len(PHANTOM_SEEDS), None, PHANTOM_SEEDS[0]
    )  # phantoms, preprocessed as the bench does
    np.savez_compressed(
        folder / "phantoms.npz",
        seeds=np.array(PHANTOM_SEEDS),
        images=images.astype(np.float32),
        truth=np.stack(truth).astype(np.uint8),
    )
    graphs = ("encoder", "denoise_step", "decoder", "decoder_argmax")
    for precision in ("fp32", "fp16"):
        log(f"exporting the {precision} bundle")
        export_bundle(
            demo_checkpoint_path(), folder / BUNDLES[precision], precision=precision, graphs=graphs, overwrite=True
        )
    log("calibrating the int8 bundle on phantoms")
    calibrate(folder / BUNDLES["fp32"], "phantoms", folder / BUNDLES["int8"], overwrite=True)
    if wheels:
        log("downloading wheels")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(folder / "wheels"),
                *WHEELS,
            ],
            check=True,
        )
    info = {
        "created": _now(),
        "git": _git(),
        "python": platform.python_version(),
        "bundles": BUNDLES,
        "phantom_seeds": list(PHANTOM_SEEDS),
        "wheels": sorted(p.name for p in (folder / "wheels").glob("*.whl")) if wheels else [],
    }
    (folder / "prepared.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"prepared {folder}")
    return folder


# --------------------------------------------------------------------------- the checks (GPU)


class Checks:
    def __init__(self, prepared: Path, out_dir: Path, budget_s: float):
        self.prepared, self.out_dir, self.budget_s = prepared, out_dir, budget_s
        self.started = time.perf_counter()
        self.results: dict[str, Result] = {}
        self.reference: np.ndarray | None = None  # torch CPU FP32 labels, (phantoms, *grid)
        self.available: dict[str, bool] = {}
        self.torch_labels: np.ndarray | None = None  # the CUDA-graph labels, scored after torch_graph

    def run(self, name: str, check: Callable[[], Result]) -> None:
        elapsed = time.perf_counter() - self.started
        if elapsed > self.budget_s:
            self.results[name] = {"status": f"not run: time budget ({elapsed:.0f} s of {self.budget_s:.0f} s spent)"}
            return
        clock = time.perf_counter()
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - a failing check is recorded and the next one runs
            result = {
                "status": "fail",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8),
            }
        result["seconds"] = round(time.perf_counter() - clock, 2)
        self.results[name] = result
        print(f"gpu_check: {name}: {result['status']} ({result['seconds']} s)", flush=True)

    # ---------------------------------------------------------------- data
    def phantoms(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        data = np.load(self.prepared / "phantoms.npz")
        return data["images"], data["truth"], [int(s) for s in data["seeds"]]

    def model(self) -> Any:
        from ldseg.runtime.select import load_model

        return load_model("demo")

    def labels_of(self, backend: Any) -> np.ndarray:
        """Labels for each phantom, one batch-1 run each with noise seed = phantom seed."""
        from ldseg.runtime.backend import make_inputs

        images, _, seeds = self.phantoms()
        return np.concatenate(
            [backend.run(make_inputs(backend.config, images[k : k + 1], [seed])).labels for k, seed in enumerate(seeds)]
        )

    def scored(self, labels: np.ndarray, precision: str = "fp32") -> Result:
        from ldseg.metrics import dice_per_class

        assert self.reference is not None
        _, truth, seeds = self.phantoms()
        per = [float((labels[k] == self.reference[k]).mean()) for k in range(len(seeds))]
        classes = int(max(truth.max(), self.reference.max())) + 1
        dice = [dice_per_class(labels[k], truth[k], classes) for k in range(len(seeds))]
        target = TARGET_AGREEMENT[precision]
        return {
            "status": "pass" if min(per) >= target else "fail",
            "agreement_per_phantom": per,
            "agreement_target": target,
            "dice_vs_truth": [{str(c): d for c, d in x.items()} for x in dice],
        }

    # ---------------------------------------------------------------- checks
    def torch_cpu_reference(self) -> Result:
        from ldseg.runtime.backends.torch_backend import TorchBackend

        self.reference = self.labels_of(TorchBackend(self.model(), "cpu"))
        classes = [int(len(np.unique(r))) for r in self.reference]
        ok = min(classes) > 1  # a real segmentation, so that agreement can fail
        return {"status": "pass" if ok else "fail", "classes_per_phantom": classes}

    def cuda_layer(self) -> Result:
        from ldseg.errors import BackendUnavailable
        from ldseg.runtime.backends.tensorrt import cuda

        try:
            cuda.set_device(0)
        except BackendUnavailable as exc:  # cuda-python absent, or no device it can use
            return {"status": f"not run: {exc}"}
        n = 1 << 16
        stream = cuda.Stream()
        host_in, host_out = cuda.PinnedArray((n,), np.float32), cuda.PinnedArray((n,), np.float32)
        a, b = cuda.DeviceBuffer(n * 4), cuda.DeviceBuffer(n * 4)

        def body() -> None:
            stream.copy_htod(a.ptr, host_in.ptr, n * 4)
            stream.copy_dtod(b.ptr, a.ptr, n * 4)
            stream.copy_dtoh(host_out.ptr, b.ptr, n * 4)

        capture = cuda.GraphCapture(stream)
        body()
        graph = capture.end(True)
        if graph is None:
            return {"status": "fail", "error": f"capture of three copies failed: {capture.reason}"}
        relaunch = []
        for scale in (1.0, 2.0):  # the second launch must see the changed input
            host_in.array[:] = np.arange(n, dtype=np.float32) * scale
            graph.launch(stream)
            stream.synchronize()
            relaunch.append(bool(np.array_equal(host_out.array, host_in.array)))
        broken = cuda.GraphCapture(stream)
        failure = None
        try:
            body()
            stream.synchronize()  # not capturable: invalidates the capture
        except cuda.CudaError as exc:
            failure = str(exc)
        fallback = broken.end(failure is None, failure)
        host_in.array[:] = 7.0
        body()  # eager, on the same stream, after the failed capture
        stream.synchronize()
        eager_ok = bool((host_out.array == 7.0).all())
        graph.destroy()
        for buf in (a, b):
            buf.free()
        for pinned in (host_in, host_out):
            pinned.free()
        stream.destroy()
        ok = all(relaunch) and fallback is None and broken.reason is not None and eager_ok
        return {
            "status": "pass" if ok else "fail",
            "relaunch_follows_inputs": relaunch,
            "broken_capture_reason": broken.reason,
            "eager_after_failed_capture": eager_ok,
        }

    def torch_graph(self) -> Result:
        import torch

        from ldseg.runtime.backend import make_inputs
        from ldseg.runtime.backends.torch_backend import TorchBackend

        model = self.model()
        graphed, eager = TorchBackend(model, "cuda:0"), TorchBackend(model, "cuda:0", cuda_graph=False)
        images, _, seeds = self.phantoms()
        max_diff, label_equal = [], []
        for k, seed in enumerate(seeds):
            inputs = make_inputs(model.cfg, images[k : k + 1], [seed])
            g, e = graphed.run(inputs, probabilities=True), eager.run(inputs, probabilities=True)
            assert g.probabilities is not None and e.probabilities is not None
            max_diff.append(float(np.abs(g.probabilities - e.probabilities).max()))
            label_equal.append(float((g.labels == e.labels).mean()))
        same_image = [
            graphed.run(make_inputs(model.cfg, images[:1], [s]), probabilities=True).probabilities for s in (100, 101)
        ]
        assert same_image[0] is not None and same_image[1] is not None
        seeds_differ = float(np.abs(same_image[0] - same_image[1]).max())
        inputs = make_inputs(model.cfg, images[:1], [seeds[0]])
        graphed.run(inputs)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        for i in range(100):
            graphed.run(make_inputs(model.cfg, images[i % len(seeds) : i % len(seeds) + 1], [i]))
        torch.cuda.synchronize()
        growth = torch.cuda.memory_allocated() - allocated
        batch = graphed.run(make_inputs(model.cfg, images, seeds), probabilities=True)
        singles = [
            graphed.run(make_inputs(model.cfg, images[k : k + 1], [s]), probabilities=True) for k, s in enumerate(seeds)
        ]
        assert batch.probabilities is not None
        batch_diff = max(
            float(np.abs(batch.probabilities[k] - s.probabilities[0]).max())  # type: ignore[index]
            for k, s in enumerate(singles)
        )
        batch_labels = float(np.mean([(batch.labels[k] == s.labels[0]).mean() for k, s in enumerate(singles)]))
        self.torch_labels = self.labels_of(graphed)
        # Same kernels for graph and eager; another batch may pick other cuDNN algorithms (so a looser bound).
        ok = (
            graphed.mode == "cuda-graph"
            and max(max_diff) <= 1e-5
            and min(label_equal) >= 0.999
            and seeds_differ > 0
            and growth == 0
            and batch_diff <= 1e-3
            and batch_labels >= 0.999
        )
        return {
            "status": "pass" if ok else "fail",
            "mode": graphed.mode,
            "fallback": graphed.fallback_reason,
            "graph_vs_eager_max_abs": max_diff,
            "graph_vs_eager_labels_equal": label_equal,
            "seeds_differ_max_abs": seeds_differ,
            "allocation_growth_bytes_over_100_replays": int(growth),
            "batch4_vs_batch1_max_abs": batch_diff,
            "batch4_vs_batch1_labels_equal": batch_labels,
            "describe": graphed.describe(),
        }

    def torch_agreement(self) -> Result:
        if self.torch_labels is None:
            return {"status": "not run: torch_graph did not finish"}
        return self.scored(self.torch_labels)

    def torch_broken_capture(self) -> Result:
        import warnings

        from ldseg.runtime.backend import make_inputs
        from ldseg.runtime.backends.torch_backend import TorchBackend

        backend = TorchBackend(self.model(), "cuda:0")
        fused = backend.model.step  # the backend's own copy of the model (it was moved to the GPU)
        forward = fused.forward

        def syncing_forward(*args: Any) -> Any:  # .item() synchronizes: not capturable
            z = forward(*args)
            z.sum().item()
            return z

        fused.forward = syncing_forward  # type: ignore[method-assign,assignment]
        images, _, seeds = self.phantoms()
        inputs = make_inputs(backend.config, images[:1], [seeds[0]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            labels = backend.run(inputs).labels
        eager = TorchBackend(self.model(), "cuda:0", cuda_graph=False).run(inputs).labels
        equal = float((labels == eager).mean())
        ok = backend.mode == "eager" and backend.fallback_reason is not None and equal == 1.0 and bool(caught)
        return {
            "status": "pass" if ok else "fail",
            "mode": backend.mode,
            "reason": backend.fallback_reason,
            "warned": [str(w.message) for w in caught][:2],
            "labels_equal_eager": equal,
        }

    def onnxruntime_cuda(self) -> Result:
        from ldseg.errors import BackendUnavailable
        from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend

        try:
            backend = OnnxRuntimeBackend(self.prepared / BUNDLES["fp32"], "cuda:0")
        except BackendUnavailable as exc:
            self.available["onnxruntime"] = False
            return {"status": f"not run: {exc}"}
        self.available["onnxruntime"] = True
        result = self.scored(self.labels_of(backend))
        result["describe"] = backend.describe()
        return result

    def tensorrt(self, precision: str) -> Result:
        from ldseg.errors import BackendUnavailable
        from ldseg.export.tensorrt_build import build_engines
        from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend
        from ldseg.runtime.backends.tensorrt.environment import require_tensorrt

        try:
            require_tensorrt()
        except BackendUnavailable as exc:
            self.available["tensorrt"] = False
            return {"status": f"not run: {exc}"}
        self.available["tensorrt"] = True
        engines = build_engines(
            self.prepared / BUNDLES[precision],
            self.out_dir / "engines" / precision,
            precision=precision,
            max_batch=4,
            overwrite=True,
        )
        backend = TensorRTBackend(engines, "cuda:0")
        result = self.scored(self.labels_of(backend), precision)
        result["describe"] = backend.describe()
        backend.close()
        return result

    def bench(self) -> Result:
        import importlib.util

        lacking = [
            m
            for m in ("matplotlib", "scipy", "typer", "rich", "psutil", "nibabel", "safetensors")
            if importlib.util.find_spec(m) is None
        ]
        if lacking:
            return {"status": f"not run: ldseg-bench needs {', '.join(lacking)}, not installed on this machine"}
        backends = ["torch"] + [b for b in ("onnxruntime", "tensorrt") if self.available.get(b)]
        out = self.out_dir / "bench"
        command = [
            sys.executable,
            "-m",
            "ldseg.bench",
            "--device",
            "cuda",
            "--checkpoint",
            "demo",
            "--bundle",
            str(self.prepared / BUNDLES["fp32"]),
            "--backends",
            ",".join(backends),
            "--steps",
            "15",
            "--batch",
            "1,4",
            "--repeat",
            "10",
            "--warmup",
            "0",
            "-o",
            str(out),
            "--overwrite",
        ]
        if backends == ["torch"]:
            command.remove("--bundle")
            command.remove(str(self.prepared / BUNDLES["fp32"]))
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        result: Result = {
            "status": "pass" if done.returncode == 0 else "fail",
            "command": " ".join(command[1:]),
            "returncode": done.returncode,
            "output_tail": (done.stdout + done.stderr)[-3000:],
        }
        if done.returncode == 0:
            rows = json.loads((out / "results.json").read_text())["rows"]
            result["rows"] = [
                {
                    "label": r["label"],
                    "steps": r["steps"],
                    "batch": r["batch"],
                    "p50_ms": r["end_to_end"]["ms"]["p50"],
                    "speedup": r["speedup_vs_reference"],
                    "agreement": r["accuracy"]["agreement"],
                }
                for r in rows
            ]
        return result


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "machine": platform.node(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    for module in ("onnxruntime", "tensorrt", "cuda.bindings", "nibabel"):
        try:
            imported = __import__(module, fromlist=["__version__"])
            info[module] = str(getattr(imported, "__version__", "present"))
        except ImportError as exc:
            info[module] = f"absent ({exc})"
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return info


def run_checks(prepared: Path, out_dir: Path, budget_s: float = BUDGET_S) -> tuple[Path, dict[str, Any]]:
    if not (prepared / "prepared.json").is_file():
        raise SystemExit(
            f"gpu_check: {prepared} is not prepared: run `bash scripts/gpu_check.sh --prepare` on a "
            "CPU machine first (it travels with the working tree)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = Checks(prepared, out_dir, budget_s)
    checks.run("torch_cpu_reference", checks.torch_cpu_reference)
    checks.run("cuda_layer", checks.cuda_layer)
    checks.run("torch_graph", checks.torch_graph)
    checks.run("torch_cuda_agreement", checks.torch_agreement)
    checks.run("torch_broken_capture", checks.torch_broken_capture)
    checks.run("onnxruntime_cuda", checks.onnxruntime_cuda)
    for precision in ("fp32", "fp16", "int8"):
        checks.run(f"tensorrt_{precision}", lambda p=precision: checks.tensorrt(p))  # type: ignore[misc]
    checks.run("bench", checks.bench)
    statuses = [r["status"] for r in checks.results.values()]
    report = {
        "schema": SCHEMA,
        "created": _now(),
        "git": _git(),
        "environment": environment(),
        "prepared": json.loads((prepared / "prepared.json").read_text()),
        "summary": {
            "pass": statuses.count("pass"),
            "fail": statuses.count("fail"),
            "not_run": sum(s.startswith("not run") for s in statuses),
            "seconds": round(time.perf_counter() - checks.started, 1),
        },
        "checks": checks.results,
    }
    path = out_dir / "gpu_check.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # whole or nothing
    return path, report


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _git() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="CPU side: export bundles, phantoms, wheels")
    parser.add_argument("--no-wheels", action="store_true", help="with --prepare: skip the wheel download")
    parser.add_argument("--prepared", type=Path, default=PREPARED, help="the prepared folder")
    parser.add_argument("--output", type=Path, default=None, help="report folder (default benchmarks/results/...)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no check after this many seconds")
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


if __name__ == "__main__":
    sys.exit(main())
