"""The registry of what can be benchmarked: backend name -> factory of a Target (a Backend + words).

Adding a backend is adding one factory here; the harness only sees Target. A factory raises
Unsupported for a precision it does not run (the harness records and prints the skip) and lets
ldseg.errors exceptions through (a missing library or GPU stops the run before anything is timed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldseg.errors import BackendUnavailable
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import Bundle
from ldseg.runtime.backend import Backend
from ldseg.runtime.backends.torch.backend import TorchBackend

REFERENCE = ("torch", "fp32", "eager")  # backend, precision, mode of the baseline every row is compared to


class Unsupported(Exception):
    """This backend does not run this precision (a skip, not an error)."""


@dataclass(frozen=True)
class Context:
    model: LDSeg
    device: str
    bundle: Path | None  # an exported bundle given with --bundle
    workdir: Path  # where a factory may export what it needs for this run
    max_batch: int = 1  # the largest batch the run times (TensorRT profiles are built for it)
    probabilities: bool = False  # backends must also return probabilities (Dice vs truth, as ldseg-run)
    int8_bundle: Path | None = None  # a calibrated INT8 bundle given with --int8-bundle


@dataclass
class Target:
    backend: Backend[Any, Any]  # the bench times its stage methods (Backend.stage_calls)
    source: str  # what it runs: "checkpoint weights", a bundle path, ...

    @property
    def mode(self) -> str:
        described = self.backend.describe()
        lean = described.get("form") == "lean"  # torch: the rewrites exports run, vs the official reference
        compiled = isinstance(self.backend, TorchBackend) and self.backend.compiled  # describe() says how
        return described.get("mode", "") + ("-lean" if lean else "") + ("-compiled" if compiled else "")

    @property
    def key(self) -> tuple[str, str, str]:
        return self.backend.name, self.backend.precision, self.mode

    @property
    def label(self) -> str:
        return "/".join(part for part in self.key if part)


Factory = Callable[[Context, str], Target]


def _torch(ctx: Context, precision: str, *, eager: bool = False, official: bool = False) -> Target:
    """fp32, bf16 (CPU or GPU) and fp16 (GPU) by autocast, in the lean form `ldseg-run` runs (the
    reference: official). No accuracy gate here: the bench reports each row's agreement with the
    FP32 reference itself (ldseg/bench/accuracy.py)."""
    from ldseg.runtime.backends.torch.declaration import precisions_on

    on_gpu = ctx.device.startswith("cuda")
    runs = precisions_on(on_gpu)
    if precision not in runs:
        raise Unsupported(f"the torch backend runs {', '.join(runs)} on {'a GPU' if on_gpu else 'the CPU'}")
    form = "official form" if official else "lean form"
    backend = TorchBackend(
        ctx.model, ctx.device, cuda_graph=False if eager else None, precision=precision, lean=not official
    )
    return Target(backend, f"torch weights, {form}" + ("" if precision == "fp32" else f", {precision} autocast"))


def reference(ctx: Context) -> Target:
    """Torch eager FP32 on the benchmark's device, the model in its official form."""
    return _torch(ctx, "fp32", eager=True, official=True)


def _bundle(ctx: Context, precision: str) -> tuple[Bundle, str]:
    """The bundle holding `precision`: --int8-bundle for int8, else the --bundle if given (its one
    precision), else one exported from the model for this run (once, shared by the backends)."""
    from ldseg.runtime.artifacts.bundle import EXPORT_PRECISIONS, load_bundle

    if precision == "int8":
        if ctx.int8_bundle is None and (ctx.bundle is None or load_bundle(ctx.bundle).precision != "int8"):
            raise Unsupported("int8 runs a calibrated bundle: give --int8-bundle (ldseg-export calibrate)")
        path = ctx.int8_bundle or ctx.bundle
        assert path is not None
        bundle = load_bundle(path)
        if bundle.precision != "int8":
            raise Unsupported(f"the given --int8-bundle is {bundle.precision}")
        return bundle, f"bundle {path}"
    if ctx.bundle is not None:
        bundle = load_bundle(ctx.bundle)
        if bundle.precision != precision:
            raise Unsupported(f"the given bundle is {bundle.precision}")
        return bundle, f"bundle {ctx.bundle}"
    if precision not in EXPORT_PRECISIONS:
        raise Unsupported(f"bundles are exported in {' or '.join(EXPORT_PRECISIONS)}")
    path = ctx.workdir / f"bundle-{precision}"
    if not path.exists():
        from ldseg.export.exporter import export_bundle

        graphs = ("encoder", "denoise_step", "decoder_argmax", *(("decoder",) if ctx.probabilities else ()))
        export_bundle(ctx.model, path, precision=precision, graphs=graphs)
    return load_bundle(path), f"{precision} bundle exported from the benchmarked model"


def _onnxruntime(ctx: Context, precision: str) -> Target:
    from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend

    if precision == "bf16":
        raise Unsupported("onnxruntime runs the bundle's fp32, fp16 or int8 only")
    bundle, source = _bundle(ctx, precision)
    threads = torch.get_num_threads()  # the same intra-op thread count as the torch rows
    backend = OnnxRuntimeBackend(bundle, ctx.device, threads=threads)
    return Target(backend, f"{source}, {threads} intra-op threads")


def _tensorrt(ctx: Context, precision: str) -> Target:
    """Engines built into the workdir from the --bundle (its precision), or from a bundle exported
    from the model (fp32/fp16); INT8 needs a calibrated --bundle. Skipped, with the reason, where
    TensorRT or a GPU is absent."""
    from ldseg.export.tensorrt_build import build_engines
    from ldseg.runtime.artifacts.bundle import EXPORT_PRECISIONS, load_bundle
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend
    from ldseg.runtime.backends.tensorrt.probe import require_tensorrt
    from ldseg.runtime.devices import device_index

    index = device_index(ctx.device)
    if index is None:
        raise Unsupported("TensorRT runs on an NVIDIA GPU: use --device cuda")
    try:
        require_tensorrt()
    except BackendUnavailable as exc:
        raise Unsupported(str(exc)) from exc
    if ctx.bundle is not None:
        bundle_dir = ctx.bundle
        if load_bundle(bundle_dir).precision != precision:
            raise Unsupported(f"the given bundle is {load_bundle(bundle_dir).precision}")
    elif precision in EXPORT_PRECISIONS:
        from ldseg.export.exporter import export_bundle

        bundle_dir = export_bundle(
            ctx.model,
            ctx.workdir / f"trt-bundle-{precision}",
            precision=precision,
            graphs=("encoder", "denoise_step", "decoder", "decoder_argmax"),
        )
    else:
        raise Unsupported(f"{precision} engines need a calibrated bundle (--bundle from ldseg-export calibrate)")
    engines = build_engines(
        bundle_dir, ctx.workdir / f"engines-{precision}", precision=precision, max_batch=ctx.max_batch, device=index
    )
    return Target(TensorRTBackend(engines, ctx.device), f"engines built from {bundle_dir}")


def _openvino(ctx: Context, precision: str) -> Target:
    """fp32 and bf16 run the FP32 bundle (bf16 by OpenVINO's precision hint), int8 the INT8 bundle."""
    from ldseg.errors import BackendUnavailable
    from ldseg.runtime.backends.openvino.backend import OpenVinoBackend, import_openvino

    if ctx.device != "cpu":
        raise Unsupported("openvino runs on the CPU")
    if precision not in ("fp32", "bf16", "int8"):
        raise Unsupported("openvino runs fp32, bf16 (from an fp32 bundle) and int8 (an int8 bundle)")
    import_openvino()  # not installed: the run stops here, like any missing library
    bundle, source = _bundle(ctx, "fp32" if precision == "bf16" else precision)
    threads = torch.get_num_threads()
    try:
        backend = OpenVinoBackend(bundle, precision, threads=threads)
    except BackendUnavailable as exc:  # bf16 on a CPU without native BF16: a skip with the reason
        raise Unsupported(str(exc)) from exc
    return Target(backend, f"{source}, {threads} threads")


FACTORIES: dict[str, Factory] = {
    "torch": _torch,
    "onnxruntime": _onnxruntime,
    "openvino": _openvino,
    "tensorrt": _tensorrt,
}


def build_target(name: str, ctx: Context, precision: str) -> Target:
    return FACTORIES[name](ctx, precision)
