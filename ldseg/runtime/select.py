"""One registry that turns (model source, backend name, device) into a Backend, and says why.

Sources: a checkpoint (torch; with an artifact cache also openvino, onnxruntime and tensorrt, whose
bundle and engines the cache exports or builds on first use), a bundle (openvino, onnxruntime), an
engine set (tensorrt). `auto` tries AUTO_ORDER — TensorRT, ONNX Runtime on CUDA, PyTorch on CUDA,
OpenVINO on CPU, ONNX Runtime on CPU, PyTorch on CPU — among what the given source can run, and says
what it skipped. On CPU OpenVINO comes first because it measured fastest there (knee3d:
benchmarks/results/amd-epyc-2c-2026-11-30/knee3d-openvino).

Everything about one backend is its declaration (ldseg/runtime/backends/<name>/declaration.py):
the sources it runs, its devices, precisions and largest K, its probe (TensorRT and a GPU,
onnxruntime's CUDA provider, openvino importable) and how it is made. This module keeps only the
auto order and the loop: each candidate is refused from its declaration, with one line saying why
and what to do, before the cache exports or builds anything. Backends import lazily: a machine
without openvino, onnxruntime-gpu or TensorRT never loads them.

`Wants.precision` "auto" runs what the source holds (FP32, or the INT8/FP16 of a calibrated/exported
bundle): reduced precision is never chosen silently; "bf16" must be asked for (OpenVINO, and torch
with its accuracy gate, whose verdict the reason carries).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ldseg.choices import BACKEND_CHOICES, RUN_PRECISIONS, VOLUME_OPS, check_choice, check_device
from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.model.config import ModelConfig
from ldseg.runtime.artifacts.source import EXPORT_EXTRA, Source
from ldseg.runtime.backend import Backend
from ldseg.runtime.backends.declaration import Declaration, Request
from ldseg.runtime.backends.onnxruntime import declaration as ONNXRUNTIME
from ldseg.runtime.backends.openvino import declaration as OPENVINO
from ldseg.runtime.backends.tensorrt import declaration as TENSORRT
from ldseg.runtime.backends.torch import declaration as TORCH
from ldseg.runtime.devices import cuda_device, device_index

# `auto`: the first of these that the source can run and that loads here wins (fastest first).
AUTO_ORDER = [
    ("tensorrt", "cuda"),
    ("onnxruntime", "cuda"),
    ("torch", "cuda"),
    ("openvino", "cpu"),
    ("onnxruntime", "cpu"),
    ("torch", "cpu"),
]


def torch_cuda_problem(index: int = 0) -> str | None:
    """Why PyTorch cannot run on GPU `index` (not installed included), None if it can."""
    return TORCH.cuda_problem(index)


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
    """What the user asked of any backend: a precision ("auto": the source's own), a thread count and
    the largest K a run will ask for (the capacity a backend must have: engines are built for it)."""

    precision: str = "auto"
    threads: int | None = None  # None: the backend's default (all cores)
    max_samples: int = 1
    volume_ops: str = "auto"  # "cpu": the run path's CPU pre/post-processing even where the device has its own


@dataclass
class Selection:
    backend: Backend
    config: ModelConfig
    why: str  # the whole story: asked for or auto, and every route skipped with its reason
    checkpoint_hash: str | None = None  # content SHA-256 of the checkpoint behind the backend, where known
    auto: bool = True  # chosen by AUTO_ORDER (not asked for by name)
    skipped: list[str] = field(default_factory=list)  # "name/device: reason", in the order tried
    gpu_asked: bool = False  # --device cuda[:N], or a GPU-only backend asked for by name
    gate: str | None = None  # a reduced precision's accuracy verdict in words (the torch backend's gate)

    def brief(self, gpu_present: bool) -> str:
        """The reason in a few words for the first screen: the skipped routes' reasons only where they
        matter (a GPU route was asked for, or a GPU is here but could not be used); else `-v` has them."""
        gate = f"; {self.gate}" if self.gate else ""
        if not self.skipped:
            return ("auto" if self.auto else "asked for") + gate
        if self.gpu_asked or gpu_present:
            return self.why
        head = "auto" if self.auto else "asked for"
        gpu_routes = all("/cuda" in s or s.endswith("--device cpu") for s in self.skipped)
        what = "no GPU route here" if gpu_routes else f"{len(self.skipped)} route(s) skipped"
        return f"{head}; {what}: -v for why{gate}"


# Each backend describes itself (ldseg/runtime/backends/*/declaration.py): sources, devices,
# precisions, capacity, probe, and how it is made.
DECLARATIONS: dict[str, Declaration] = {
    d.name: d for d in (TORCH.DECLARATION, ONNXRUNTIME.DECLARATION, OPENVINO.DECLARATION, TENSORRT.DECLARATION)
}
TENSORRT_BUNDLE_PRECISION = TENSORRT.BUNDLE_PRECISION


def _make(name: str, request: Request) -> Selection:
    """One candidate: refused (BackendUnavailable) before anything is exported or built, else made."""
    made = DECLARATIONS[name].select(request)
    return Selection(made.backend, made.config, "", made.checkpoint_hash, gate=made.gate)


def _auto_candidates(source: Source, gpu: str | None) -> list[tuple[str, str]]:
    """AUTO_ORDER among what the source runs; "cuda" is the GPU asked for (None: CPU only)."""
    devices = {"cpu": "cpu", **({"cuda": gpu} if gpu is not None else {})}
    runs = [(name, dev) for name, dev in AUTO_ORDER if dev in devices and DECLARATIONS[name].runs(source)]
    return [(name, devices[dev]) for name, dev in runs]


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
    try:
        check_choice("--backend", backend, BACKEND_CHOICES)
        check_choice("--precision", wants.precision, RUN_PRECISIONS)
        check_choice("--volume-ops", wants.volume_ops, VOLUME_OPS)
        check_device(device)
    except ValueError as exc:
        raise BackendUnavailable(str(exc)) from None
    if wants.max_samples < 1:
        raise BackendUnavailable(f"samples {wants.max_samples}: K must be at least 1")
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
    on_gpu = [f"{name}/{dev}" for name, dev in AUTO_ORDER if dev == "cuda" and DECLARATIONS[name].runs(source)]
    if backend == "auto" and gpu_device is None and on_gpu:
        skipped.append(f"{', '.join(on_gpu)}: --device cpu")
    errors: list[BackendUnavailable] = []
    for name, dev in candidates:
        try:
            selection = _make(name, Request(source, dev, wants.precision, wants.threads, wants.max_samples))
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
        selection.backend.volume_path = wants.volume_ops
        selection.backend.prepare(1)  # K samples encode at batch 1: what every run needs first
        if backend != "auto":
            selection.why = "asked for" + (f"; skipped {'; '.join(skipped)}" if skipped else "")
        else:
            on = "a GPU" if dev != "cpu" else "CPU"
            first = f"first available for this source on {on}"
            selection.why = f"auto: {'; '.join(skipped)}" if skipped else f"auto: {first}"
        if selection.gate:
            selection.why += f"; {selection.gate}"
        return selection
    if backend != "auto" and len({str(e) for e in errors}) == 1:  # one backend, one reason (e.g. wrong source)
        raise errors[0]
    no_torch = [e for e in errors if EXPORT_EXTRA in str(e)]
    if no_torch and source.cached:  # the runtime-only install on a checkpoint not in the cache: that is the news
        raise no_torch[0]
    raise BackendUnavailable("no backend can run this source here: " + "; ".join(skipped))
