"""One registry that turns (model source, backend name, device) into a Backend, and says why.

Sources: a checkpoint (torch), a bundle (openvino, onnxruntime), an engine set (tensorrt). `auto`
prefers, in order, TensorRT (engines given, TensorRT importable, engines built for this GPU), ONNX
Runtime on CUDA, PyTorch on CUDA, OpenVINO on CPU, ONNX Runtime on CPU, PyTorch on CPU — among what
the given source can run. On CPU OpenVINO comes first because it measured fastest there (knee3d:
benchmarks/results/amd-epyc-2c-2026-11-30/knee3d-openvino). Backends import lazily: a machine without
openvino, onnxruntime-gpu or TensorRT never loads them, and auto says why it skipped them.

`precision` "auto" runs what the source holds (FP32, or the INT8/FP16 of a calibrated/exported
bundle): reduced precision is never chosen silently; "bf16" must be asked for (OpenVINO only).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.model.checkpoint import load_checkpoint
from ldseg.model.config import ModelConfig
from ldseg.model.network import LDSeg
from ldseg.runtime.backend import Backend
from ldseg.runtime.devices import cuda_device, device_index, torch_cuda_problem

SEGMENT_NEEDS = ("image_encoder", "denoiser", "label_decoder")
RECONSTRUCT_NEEDS = ("label_encoder", "label_decoder")
BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")


def demo_checkpoint_path() -> Path:
    return Path(str(resources.files("ldseg.data") / "demo.safetensors"))


def resolve_checkpoint(name: str | Path) -> Path:
    """`demo` names the bundled model; anything else is a path."""
    path = demo_checkpoint_path() if str(name) == "demo" else Path(name)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    return path


def _refuse_untrained(source: Path, trained: dict[str, bool], needs: tuple[str, ...]) -> None:
    missing = [name for name in needs if not trained.get(name, False)]
    if missing:
        raise ArtifactError(
            f"{source}: component(s) {', '.join(missing)} hold no trained weights "
            "(the official release has no denoiser: train one with ldseg-train)"
        )


def load_model(checkpoint: str | Path, needs: tuple[str, ...] = SEGMENT_NEEDS) -> LDSeg:
    path = resolve_checkpoint(checkpoint)
    model = load_checkpoint(path)
    _refuse_untrained(path, model.trained, needs)
    return model


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
class Source:
    """Exactly one of checkpoint, bundle, engines."""

    checkpoint: str | None = None
    bundle: Path | None = None
    engines: Path | None = None
    trust_unvalidated: bool = False  # load a bundle whose manifest records no passed validation


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
    why: str


def _torch(source: Source, device: str, wants: Wants) -> Selection:
    from ldseg.runtime.torch_backend import TorchBackend

    if source.checkpoint is None:
        raise BackendUnavailable("the torch backend runs a checkpoint (--checkpoint)")
    index = device_index(device)
    problem = None if index is None else torch_cuda_problem(index)
    if problem:
        raise BackendUnavailable(problem)
    _refuse_precision("torch", wants, "fp32")
    model = load_model(source.checkpoint)
    return Selection(TorchBackend(model, device), model.cfg, "")


def _onnxruntime(source: Source, device: str, wants: Wants) -> Selection:
    from ldseg.runtime.bundle import load_bundle
    from ldseg.runtime.onnxruntime_backend import OnnxRuntimeBackend

    if source.bundle is None:
        raise BackendUnavailable("the onnxruntime backend runs an exported bundle (--bundle)")
    bundle = load_bundle(source.bundle, trust_unvalidated=source.trust_unvalidated)
    _refuse_untrained(source.bundle, dict(bundle.trained), SEGMENT_NEEDS)
    _refuse_precision("onnxruntime", wants, bundle.precision)
    return Selection(OnnxRuntimeBackend(bundle, device, threads=wants.threads), bundle.config, "")


def _openvino(source: Source, device: str, wants: Wants) -> Selection:
    from ldseg.runtime.bundle import load_bundle
    from ldseg.runtime.openvino_backend import OpenVinoBackend, import_openvino

    if source.bundle is None:
        raise BackendUnavailable("the openvino backend runs an exported bundle (--bundle)")
    if device != "cpu":
        raise BackendUnavailable("the openvino backend runs on the CPU (--device cpu, or auto)")
    import_openvino()  # not installed: say so before reading the bundle
    bundle = load_bundle(source.bundle, trust_unvalidated=source.trust_unvalidated)
    _refuse_untrained(source.bundle, dict(bundle.trained), SEGMENT_NEEDS)
    backend = OpenVinoBackend(bundle, wants.precision, threads=wants.threads)
    return Selection(backend, bundle.config, "")


def _tensorrt(source: Source, device: str, wants: Wants) -> Selection:
    from ldseg.runtime.engines import read_engine_set
    from ldseg.runtime.tensorrt_backend import TensorRTBackend

    if source.engines is None:
        raise BackendUnavailable("the tensorrt backend runs an engine set (--engines)")
    if device_index(device) is None:
        raise BackendUnavailable("the tensorrt backend needs --device cuda (or auto on a GPU machine)")
    engine_set = read_engine_set(source.engines)
    _refuse_precision("tensorrt", wants, engine_set.precision)
    return Selection(TensorRTBackend(source.engines, device), engine_set.config, "")


_FACTORIES = {"torch": _torch, "onnxruntime": _onnxruntime, "openvino": _openvino, "tensorrt": _tensorrt}


def _auto_candidates(source: Source, gpu: str | None) -> list[tuple[str, str]]:
    order = []
    if source.engines is not None and gpu:
        order.append(("tensorrt", gpu))
    if source.bundle is not None and gpu:
        order.append(("onnxruntime", gpu))
    if source.checkpoint is not None and gpu:
        order.append(("torch", gpu))
    if source.bundle is not None:
        order += [("openvino", "cpu"), ("onnxruntime", "cpu")]
    if source.checkpoint is not None:
        order.append(("torch", "cpu"))
    return order


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
    skipped: list[str] = []
    errors: list[BackendUnavailable] = []
    for name, dev in candidates:
        try:
            selection = _FACTORIES[name](source, dev, wants)
        except BackendUnavailable as exc:  # announced, then the next candidate
            skipped.append(f"{name}/{dev}: {exc}")
            errors.append(exc)
            continue
        if backend != "auto":
            selection.why = "asked for" + (f"; skipped {'; '.join(skipped)}" if skipped else "")
        else:
            on = "a GPU" if dev != "cpu" else "CPU"
            first = f"first available for this source on {on}"
            selection.why = f"auto: {'; '.join(skipped)}" if skipped else f"auto: {first}"
        return selection
    if backend != "auto" and len({str(e) for e in errors}) == 1:  # one backend, one reason (e.g. wrong source)
        raise errors[0]
    raise BackendUnavailable("no backend can run this source here: " + "; ".join(skipped))
