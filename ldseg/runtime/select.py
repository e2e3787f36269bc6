"""One registry that turns (model source, backend name, device) into a Backend, and says why.

Sources: a checkpoint (torch; with an artifact cache also openvino, onnxruntime and tensorrt, whose
bundle and engines the cache exports or builds on first use), a bundle (openvino, onnxruntime), an
engine set (tensorrt). `auto` tries AUTO_ORDER — TensorRT, ONNX Runtime on CUDA, PyTorch on CUDA,
OpenVINO on CPU, ONNX Runtime on CPU, PyTorch on CPU — among what the given source can run, and says
what it skipped. On CPU OpenVINO comes first because it measured fastest there (knee3d:
benchmarks/results/amd-epyc-2c-2026-11-30/knee3d-openvino). Each candidate checks that it can run
here (TensorRT and a GPU, onnxruntime's CUDA provider, openvino importable) before the cache exports
or builds anything. Backends import lazily: a machine without openvino, onnxruntime-gpu or TensorRT
never loads them.

`Wants.precision` "auto" runs what the source holds (FP32, or the INT8/FP16 of a calibrated/exported
bundle): reduced precision is never chosen silently; "bf16" must be asked for (OpenVINO only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.model.config import ModelConfig
from ldseg.runtime.artifacts.source import (  # noqa: F401  (Source and its helpers, re-exported for callers)
    EXPORT_EXTRA,
    RECONSTRUCT_NEEDS,
    SEGMENT_NEEDS,
    Source,
    demo_checkpoint_path,
    load_model,
    refuse_untrained,
    resolve_checkpoint,
    source_config,
    torch_missing,
)
from ldseg.runtime.backend import Backend
from ldseg.runtime.devices import cuda_device, device_index

if TYPE_CHECKING:
    from ldseg.runtime.artifacts.engines import Environment
BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
# `auto`: the first of these that the source can run and that loads here wins (fastest first).
AUTO_ORDER = [
    ("tensorrt", "cuda"),
    ("onnxruntime", "cuda"),
    ("torch", "cuda"),
    ("openvino", "cpu"),
    ("onnxruntime", "cpu"),
    ("torch", "cpu"),
]
TENSORRT_BUNDLE_PRECISION = "fp16"  # what a checkpoint is exported to for TensorRT (validated like any bundle)


def torch_cuda_problem(index: int = 0) -> str | None:
    """Why PyTorch cannot run on GPU `index` (not installed included), None if it can."""
    missing = torch_missing("the torch backend")
    if missing is not None:
        return str(missing)
    from ldseg.runtime.backends.torch.backend import torch_cuda_problem as probe

    return probe(index)


def cuda_available(index: int = 0) -> bool:
    """PyTorch can run on GPU `index` (the torch route only: other routes ask their own stack)."""
    return torch_cuda_problem(index) is None


def resolve_device(device: str) -> str:
    """A device for the torch route (the bench's reference): auto -> cuda if PyTorch can use one."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    index = device_index(device)
    if index is not None:
        problem = torch_cuda_problem(index)
        if problem:
            raise BackendUnavailable(f"--device {device}: {problem}")
    return device


@dataclass(frozen=True)
class Wants:
    """What the user asked of any backend: a precision ("auto": the source's own) and a thread count."""

    precision: str = "auto"
    threads: int | None = None  # None: the backend's default (all cores)


def _refuse_precision(name: str, wants: Wants, runs: str) -> None:
    if wants.precision not in ("auto", runs):
        raise BackendUnavailable(f"the {name} backend runs {runs} here, not {wants.precision}")


@dataclass
class Selection:
    backend: Backend
    config: ModelConfig
    why: str  # the whole story: asked for or auto, and every route skipped with its reason
    checkpoint_hash: str | None = None  # content SHA-256 of the checkpoint behind the backend, where known
    auto: bool = True  # chosen by AUTO_ORDER (not asked for by name)
    skipped: list[str] = field(default_factory=list)  # "name/device: reason", in the order tried
    gpu_asked: bool = False  # --device cuda[:N], or a GPU-only backend asked for by name

    def brief(self, gpu_present: bool) -> str:
        """The reason in a few words for the first screen: the skipped routes' reasons only where they
        matter (a GPU route was asked for, or a GPU is here but could not be used); else `-v` has them."""
        if not self.skipped:
            return "auto" if self.auto else "asked for"
        if self.gpu_asked or gpu_present:
            return self.why
        head = "auto" if self.auto else "asked for"
        gpu_routes = all("/cuda" in s or s.endswith("--device cpu") for s in self.skipped)
        what = "no GPU route here" if gpu_routes else f"{len(self.skipped)} route(s) skipped"
        return f"{head}; {what}: -v for why"


def _torch(source: Source, device: str, wants: Wants) -> Selection:
    if source.checkpoint is None:
        raise BackendUnavailable("the torch backend runs a checkpoint (--checkpoint)")
    missing = torch_missing("the torch backend")
    if missing is not None:
        raise missing
    from ldseg.runtime.backends.torch.backend import TorchBackend

    index = device_index(device)
    problem = None if index is None else torch_cuda_problem(index)
    if problem:
        raise BackendUnavailable(problem)
    _refuse_precision("torch", wants, "fp32")
    model = source.model()
    return Selection(TorchBackend(model, device, threads=wants.threads), model.cfg, "", model.checkpoint_hash)


def _onnxruntime_device(device: str) -> None:
    from ldseg.runtime.backends.onnxruntime.probe import ort_cuda_problem

    problem = None if device_index(device) is None else ort_cuda_problem()
    if problem:
        raise BackendUnavailable(problem)


def _bundle_path(source: Source, name: str) -> Path:
    """The bundle a bundle backend runs: the one given, or the checkpoint's FP32 export from the cache."""
    if source.bundle is not None:
        return source.bundle
    if source.cached:
        assert source.artifacts is not None
        return source.artifacts.bundle(source.reference())
    raise BackendUnavailable(f"the {name} backend runs an exported bundle (--bundle)")


def _onnxruntime(source: Source, device: str, wants: Wants) -> Selection:
    from ldseg.runtime.artifacts.bundle import load_bundle
    from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend

    if source.bundle is None and source.cached:
        _onnxruntime_device(device)  # before minutes of exporting
    path = _bundle_path(source, "onnxruntime")
    bundle = load_bundle(path, trust_unvalidated=source.trust_unvalidated)
    refuse_untrained(path, dict(bundle.trained), SEGMENT_NEEDS)
    _refuse_precision("onnxruntime", wants, bundle.precision)
    backend = OnnxRuntimeBackend(bundle, device, threads=wants.threads)
    return Selection(backend, bundle.config, "", bundle.checkpoint_hash)


def _openvino(source: Source, device: str, wants: Wants) -> Selection:
    from ldseg.runtime.artifacts.bundle import load_bundle
    from ldseg.runtime.backends.openvino.backend import OpenVinoBackend, import_openvino

    if device != "cpu":
        raise BackendUnavailable("the openvino backend runs on the CPU (--device cpu, or auto)")
    import_openvino()  # not installed: say so before reading or exporting a bundle
    path = _bundle_path(source, "openvino")
    bundle = load_bundle(path, trust_unvalidated=source.trust_unvalidated)
    refuse_untrained(path, dict(bundle.trained), SEGMENT_NEEDS)
    # Compiled models live beside the run's artifacts (a --no-cache run's temporary folder included).
    from ldseg.runtime.artifacts.cache import cache_root

    cache = (source.artifacts.root if source.artifacts is not None else cache_root()) / "openvino"
    backend = OpenVinoBackend(bundle, wants.precision, threads=wants.threads, cache=cache)
    return Selection(backend, bundle.config, "", bundle.checkpoint_hash)


def _tensorrt(source: Source, device: str, wants: Wants) -> Selection:
    from ldseg.runtime.artifacts.engines import read_engine_set
    from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend

    index = device_index(device)
    if index is None:
        raise BackendUnavailable("the tensorrt backend needs --device cuda (or auto on a GPU machine)")
    checkpoint_hash = None
    if source.engines is not None:
        path = source.engines
    elif source.cached:
        assert source.artifacts is not None
        environment = tensorrt_environment(index)  # TensorRT and this GPU, before minutes of exporting
        reference = source.reference()
        bundle = source.artifacts.bundle(reference, precision=TENSORRT_BUNDLE_PRECISION)
        path = source.artifacts.engines(bundle, environment, max_batch=source.samples)
        checkpoint_hash = reference.sha256
    else:
        raise BackendUnavailable("the tensorrt backend runs an engine set (--engines)")
    engine_set = read_engine_set(path)
    _refuse_precision("tensorrt", wants, engine_set.precision)
    return Selection(TensorRTBackend(path, device), engine_set.config, "", checkpoint_hash)


def tensorrt_environment(index: int = 0) -> Environment:
    """This machine's TensorRT version and GPU `index`; BackendUnavailable without either (tests fake this)."""
    from ldseg.runtime.backends.tensorrt.probe import detect_environment

    return detect_environment(index)


_FACTORIES = {"torch": _torch, "onnxruntime": _onnxruntime, "openvino": _openvino, "tensorrt": _tensorrt}
# Which sources each backend runs (a checkpoint with a cache runs on every backend).
_RUNS: dict[str, Callable[[Source], bool]] = {
    "tensorrt": lambda s: s.engines is not None or s.cached,
    "onnxruntime": lambda s: s.bundle is not None or s.cached,
    "openvino": lambda s: s.bundle is not None or s.cached,
    "torch": lambda s: s.checkpoint is not None,
}


def _auto_candidates(source: Source, gpu: str | None) -> list[tuple[str, str]]:
    """AUTO_ORDER among what the source runs; "cuda" is the GPU asked for (None: CPU only)."""
    devices = {"cpu": "cpu", **({"cuda": gpu} if gpu is not None else {})}
    return [(name, devices[dev]) for name, dev in AUTO_ORDER if dev in devices and _RUNS[name](source)]


def select_backend(
    source: Source, backend: str = "auto", device: str = "auto", gpu: int = 0, wants: Wants | None = None
) -> Selection:
    """The chosen backend, its model config, and a sentence saying why.

    GPU candidates are not gated on any one library: each factory checks its own route (torch.cuda,
    ONNX Runtime's providers, cuda-python) and a refusal, with its reason, moves on to the next
    candidate. `gpu` is the device index every backend uses (torch cuda:N, ORT device_id, TensorRT).
    """
    wants = wants or Wants()
    given = [s for s in (source.checkpoint, source.bundle, source.engines) if s is not None]
    if len(given) != 1:
        raise BackendUnavailable("give exactly one of --checkpoint, --bundle, --engines")
    if backend not in BACKENDS:
        raise BackendUnavailable(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if wants.precision not in PRECISIONS:
        raise BackendUnavailable(f"--precision {wants.precision}: choose one of {', '.join(PRECISIONS)}")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise BackendUnavailable(f"--device {device}: choose cpu, cuda or auto")
    index = device_index(device) if device != "auto" else None
    gpu_device = None if device == "cpu" else cuda_device(gpu if index is None else index)
    if backend == "auto":
        candidates = _auto_candidates(source, gpu_device)
        if index is not None:  # --device cuda: the GPU candidates only
            candidates = [(name, dev) for name, dev in candidates if dev != "cpu"]
    else:  # only this backend: on the asked device, or (auto) GPU first, then CPU where it runs there
        if gpu_device is None:
            devices = ["cpu"]
        elif device != "auto" or backend == "tensorrt":
            devices = [gpu_device]
        else:
            devices = [gpu_device, "cpu"]
        candidates = [(backend, d) for d in devices]
    if source.cached:
        source.reference()  # a bad checkpoint is its own error (exit 4), not a reason to skip candidates
    skipped: list[str] = []
    on_gpu = [f"{name}/{dev}" for name, dev in AUTO_ORDER if dev == "cuda" and _RUNS[name](source)]
    if backend == "auto" and gpu_device is None and on_gpu:
        skipped.append(f"{', '.join(on_gpu)}: --device cpu")
    errors: list[BackendUnavailable] = []
    for name, dev in candidates:
        try:
            selection = _FACTORIES[name](source, dev, wants)
        except BackendUnavailable as exc:  # announced, then the next candidate
            skipped.append(f"{name}/{dev}: {exc}")
            errors.append(exc)
            continue
        except ArtifactError as exc:
            if not (backend == "auto" and source.cached and name != "torch"):
                raise
            # The checkpoint loaded: this is its export failing validation. The next candidate
            # (in the end PyTorch on the checkpoint itself) still runs it correctly.
            skipped.append(f"{name}/{dev}: {exc}")
            continue
        selection.auto, selection.skipped = backend == "auto", list(skipped)
        selection.gpu_asked = index is not None or backend == "tensorrt"
        selection.backend.prepare(1)  # K samples encode at batch 1: what every run needs first
        if backend != "auto":
            selection.why = "asked for" + (f"; skipped {'; '.join(skipped)}" if skipped else "")
        else:
            on = "a GPU" if dev != "cpu" else "CPU"
            first = f"first available for this source on {on}"
            selection.why = f"auto: {'; '.join(skipped)}" if skipped else f"auto: {first}"
        return selection
    if backend != "auto" and len({str(e) for e in errors}) == 1:  # one backend, one reason (e.g. wrong source)
        raise errors[0]
    no_torch = [e for e in errors if EXPORT_EXTRA in str(e)]
    if no_torch and source.cached:  # the runtime-only install on a checkpoint not in the cache: that is the news
        raise no_torch[0]
    raise BackendUnavailable("no backend can run this source here: " + "; ".join(skipped))
