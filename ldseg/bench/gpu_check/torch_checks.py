"""The gpu_check run's shared state and its torch and cuda-python checks.

`Checks.run` is where every check goes through the one budget (report.py): a check starts only if
time is left, is watched while it runs, and the report is rewritten when it ends. The checks of
the other GPU backends (ONNX Runtime CUDA, TensorRT, the bench) are in backend_checks.py.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ldseg.bench.gpu_check.prepare import TARGET_AGREEMENT
from ldseg.bench.gpu_check.report import Budget, Report, Result, Watchdog


def prepared_info(prepared: Path) -> dict[str, Any]:
    path = prepared / "prepared.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class Checks:
    def __init__(
        self,
        prepared: Path,
        out_dir: Path,
        budget_s: float,
        *,
        clock: Callable[[], float] = time.perf_counter,
        watchdog: bool = True,
    ):
        self.prepared, self.out_dir = prepared, out_dir
        self.budget = Budget(budget_s, clock)
        self.report = Report(out_dir, self.budget, prepared_info(prepared))
        self.results: dict[str, Result] = self.report.results
        self.watchdog = Watchdog(self.report) if watchdog else None
        self.reference: np.ndarray | None = None  # torch CPU FP32 labels, (phantoms, *grid)
        self.available: dict[str, bool] = {}
        self.torch_labels: np.ndarray | None = None  # the CUDA-graph labels, scored after torch_graph
        self.engines: dict[str, Path] = {}  # TensorRT engine sets built so far, by precision

    @property
    def budget_s(self) -> float:
        return self.budget.seconds

    def remaining(self) -> float:
        """Seconds left of the run's budget (what a check may still spend)."""
        return self.budget.remaining()

    def run(self, name: str, check: Callable[[], Result]) -> None:
        """Run one check within the budget; the report is rewritten before and after it."""
        elapsed = self.budget.elapsed()
        if self.remaining() <= 0:
            self.results[name] = {"status": f"not run: time budget ({elapsed:.0f} s of {self.budget_s:.0f} s spent)"}
            self.report.write()
            return
        self.report.running = name
        self.report.write()
        if self.watchdog is not None:
            self.watchdog.arm(name)
        clock = time.perf_counter()
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - a failing check is recorded and the next one runs
            result = {
                "status": "fail",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8),
            }
        finally:
            if self.watchdog is not None:
                self.watchdog.disarm()
        result["seconds"] = round(time.perf_counter() - clock, 2)
        self.results[name] = result
        self.report.running = None
        self.report.write()
        print(f"gpu_check: {name}: {result['status']} ({result['seconds']} s)", flush=True)

    # ---------------------------------------------------------------- data
    def phantoms(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        data = np.load(self.prepared / "phantoms.npz")
        return data["images"], data["truth"], [int(s) for s in data["seeds"]]

    def model(self) -> Any:
        from ldseg.runtime.artifacts.source import load_model

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
        from ldseg.runtime.backends.torch.backend import TorchBackend

        # The official form; the GPU rows run the lean one (what ldseg-run makes), so the agreement
        # rows check its rewrites on the GPU too.
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
        from ldseg.runtime.backends.torch.backend import TorchBackend

        model = self.model()
        graphed, eager = (
            TorchBackend(model, "cuda:0", lean=True),
            TorchBackend(model, "cuda:0", cuda_graph=False, lean=True),
        )
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
        from ldseg.runtime.backends.torch.backend import TorchBackend

        backend = TorchBackend(self.model(), "cuda:0", lean=True)
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
        eager = TorchBackend(self.model(), "cuda:0", cuda_graph=False, lean=True).run(inputs).labels
        equal = float((labels == eager).mean())
        ok = backend.mode == "eager" and backend.fallback_reason is not None and equal == 1.0 and bool(caught)
        return {
            "status": "pass" if ok else "fail",
            "mode": backend.mode,
            "reason": backend.fallback_reason,
            "warned": [str(w.message) for w in caught][:2],
            "labels_equal_eager": equal,
        }

    def torch_reduced(self, precision: str, compile: bool = False) -> Result:
        """torch bf16/fp16 (autocast, one CUDA-graph replay) held against FP32 on the phantoms: each
        phantom's agreement with the CPU FP32 reference and with FP32 on this GPU at the accuracy
        gate's bar, Dice vs truth, and the median end-to-end time of both on the GPU. compile: the
        reduced backend's stages torch.compiled (compiled on its first run, then captured); a stage
        that fell back to eager fails the check, since then compile was not what was checked."""
        import torch

        if not torch.cuda.is_available():
            return {"status": "not run: no CUDA GPU visible to PyTorch"}
        if self.reference is None:
            return {"status": "not run: torch_cpu_reference did not finish"}
        from ldseg.bench.timing import median_ms, timer_for
        from ldseg.runtime.backend import make_inputs
        from ldseg.runtime.backends.torch.backend import TorchBackend
        from ldseg.runtime.backends.torch.gate import GATE_AGREEMENT

        model = self.model()
        reduced, fp32 = (
            TorchBackend(model, "cuda:0", precision=precision, lean=True, compile=compile),
            TorchBackend(model, "cuda:0", lean=True),
        )
        labels, gpu_fp32 = self.labels_of(reduced), self.labels_of(fp32)
        scored = self.scored(labels)
        vs_gpu = [float((labels[k] == gpu_fp32[k]).mean()) for k in range(len(labels))]
        images, _, seeds = self.phantoms()
        inputs = make_inputs(model.cfg, images[:1], [seeds[0]])
        timer = timer_for("cuda:0")

        def end_to_end(backend: TorchBackend) -> float:
            return median_ms(lambda: backend.run(inputs), timer, runs=10, warmup=backend.capture_from)

        ms = {"fp32": end_to_end(fp32), precision: end_to_end(reduced)}
        ok = min(scored["agreement_per_phantom"]) >= GATE_AGREEMENT and min(vs_gpu) >= GATE_AGREEMENT
        ok = ok and (reduced.compiled or not compile)
        return {
            **scored,
            "status": "pass" if ok else "fail",
            "agreement_target": GATE_AGREEMENT,
            "agreement_vs_gpu_fp32": vs_gpu,
            "end_to_end_ms_p50": ms,
            "mode": reduced.mode,
            "describe": reduced.describe(),
        }

    def torch_k_samples(self) -> Result:
        from ldseg.bench.gpu_check.compare import closing, k_inputs, k_samples_within_budget
        from ldseg.runtime.backends.torch.backend import TorchBackend

        model = self.model()
        graphed, eager = (
            TorchBackend(model, "cuda:0", lean=True),
            TorchBackend(model, "cuda:0", cuda_graph=False, lean=True),
        )
        with closing(graphed, eager):
            return k_samples_within_budget(graphed, eager, k_inputs(self, model.cfg), _torch_free_memory)


def _torch_free_memory() -> int:
    import torch

    return int(torch.cuda.mem_get_info(0)[0])
