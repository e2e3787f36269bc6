"""An emulated GPU for the tests: cuda-python's runtime API and TensorRT, behaving, not answering.

The TensorRT backend cannot run here (no GPU, no TensorRT). This fixture gives it a machine whose
behaviour the defects depend on, so `TensorRTBackend.run` executes end to end on CPU:

- device memory is host memory (numpy, 256-byte aligned); a pointer is its real address, so
  `cudaMemcpyAsync` really copies (ctypes.memmove) and the backend's pinned arrays are real;
- a stream executes each operation when it is enqueued (outside a capture) and logs it;
- `cudaStreamBeginCapture` makes the stream record instead: copies and engine launches enqueued
  during a capture are kept, not run; `cudaStreamSynchronize` during a capture invalidates it (as
  CUDA does: it is not capturable); `cudaGraphLaunch` replays the recorded operations in order,
  reading the memory at launch time;
- a TensorRT execution context's `execute_async_v3` runs the engine's math on the addresses bound
  with `set_tensor_address`: an "engine" file is a small JSON naming the bundle's ONNX graph, run
  through ONNX Runtime on CPU; every named axis (the batch, the volume engines' grid axes) takes
  its size from the input shapes set on the context, and an input shape outside the profile the
  JSON records (the volume engines') is refused, as TensorRT does. The volume engines' "ONNX graph"
  is the float32 graph of ldseg/runtime/volume_graphs.py, saved beside them.

`fail_capture` makes every execute_async_v3 inside a capture return false (a capture that fails,
as an unsupported layer does); `fail_eager` makes the eager ones fail too. Never shipped: this is a
test fixture, the backend registry knows nothing of it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ldseg.export.build_options import (
    batch_profile,
    file_digest,
    sample_profiles,
    tensors_of,
    volume_profiles,
    write_engines_json,
)
from ldseg.export.tensorrt_build import BuildOptions, describe_engine_set
from ldseg.runtime.artifacts.bundle import load_bundle
from ldseg.runtime.artifacts.engines import ENGINE_SUFFIX, EngineFile, Environment, InputProfile
from ldseg.runtime.sample_graphs import SAMPLE_GRAPHS
from ldseg.runtime.volume_graphs import GRAPHS
from ldseg.runtime.volume_ops import FLOAT32

TRT_VERSION = "10.13.0.35"
GPU = SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\0", major=9, minor=0, totalGlobalMem=80 * 2**30)
EMULATED = Environment(trt_version=TRT_VERSION, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")

OK = 0
CAPTURE_UNSUPPORTED = 900
CAPTURE_INVALIDATED = 901
ERROR_NAMES = {
    OK: "cudaSuccess",
    CAPTURE_UNSUPPORTED: "cudaErrorStreamCaptureUnsupported",
    CAPTURE_INVALIDATED: "cudaErrorStreamCaptureInvalidated",
}
NOT_CAPTURING, ACTIVE, INVALIDATED = 0, 1, 2
_NUMPY = {"FLOAT": np.float32, "UINT8": np.uint8, "HALF": np.float16, "INT32": np.int32}
_TRT_OF_NUMPY = {"float32": "FLOAT", "uint8": "UINT8", "float16": "HALF", "int32": "INT32"}


@dataclass
class _Stream:
    capture: int = NOT_CAPTURING
    recorded: list[tuple[str, Callable[[], None]]] = field(default_factory=list)


@dataclass
class Emulator:
    """One emulated GPU: memory, streams, graphs, and the log of what ran (for the tests)."""

    fail_capture: bool = False
    fail_eager: bool = False
    memory: dict[int, np.ndarray] = field(default_factory=dict)  # address -> backing array
    streams: dict[int, _Stream] = field(default_factory=dict)
    graphs: dict[int, list[tuple[str, Callable[[], None]]]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # every operation executed, in order ("replay" marks launches)
    last_error: int = OK
    _next: int = 1

    def handle(self) -> int:
        self._next += 1
        return self._next

    def allocate(self, nbytes: int) -> int:
        raw = np.zeros(nbytes + 256, np.uint8)
        address = raw.ctypes.data
        ptr = address + (-address % 256)
        self.memory[ptr] = raw
        return ptr

    def enqueue(self, stream: int, what: str, op: Callable[[], None]) -> None:
        s = self.streams[stream]
        if s.capture == ACTIVE:
            s.recorded.append((what, op))
        elif s.capture == NOT_CAPTURING:
            op()
            self.log.append(what)
        # an invalidated capture records nothing more

    def capturing(self, stream: int) -> bool:
        return self.streams[stream].capture != NOT_CAPTURING

    def view(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """The numpy array at a device (or pinned) address, as TensorRT would read or write it."""
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * np.dtype(dtype).itemsize
        raw = (ctypes.c_ubyte * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class FakeCudart:
    """cuda-python's `cuda.bindings.runtime` over an Emulator: every call returns (error, *values)."""

    cudaError_t = SimpleNamespace(cudaSuccess=OK)  # noqa: N815 - the binding's names
    cudaStreamNonBlocking = 1  # noqa: N815
    cudaMemcpyKind = SimpleNamespace(  # noqa: N815
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)  # noqa: N815
    cudaStreamCaptureStatus = SimpleNamespace(  # noqa: N815
        cudaStreamCaptureStatusNone=NOT_CAPTURING,
        cudaStreamCaptureStatusActive=ACTIVE,
        cudaStreamCaptureStatusInvalidated=INVALIDATED,
    )

    def __init__(self, gpu: Emulator):
        self.gpu = gpu

    # device and errors
    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:  # noqa: N802
        return (OK, ERROR_NAMES.get(err, f"cudaError{err}").encode())

    def cudaGetDeviceCount(self) -> tuple[int, int]:  # noqa: N802
        return (OK, 1)

    def cudaGetDeviceProperties(self, index: int) -> tuple[int, Any]:  # noqa: N802
        return (OK, GPU)

    def cudaSetDevice(self, index: int) -> tuple[int]:  # noqa: N802
        return (OK,)

    def cudaMemGetInfo(self) -> tuple[int, int, int]:  # noqa: N802 - what the emulator has handed out
        used = sum(raw.nbytes for raw in self.gpu.memory.values())
        return (OK, GPU.totalGlobalMem - used, GPU.totalGlobalMem)

    def cudaGetLastError(self) -> tuple[int]:  # noqa: N802
        err, self.gpu.last_error = self.gpu.last_error, OK
        return (err,)

    # memory
    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:  # noqa: N802
        return (OK, self.gpu.allocate(nbytes))

    cudaMallocHost = cudaMalloc  # noqa: N815 - pinned memory is host memory too

    def cudaFree(self, ptr: int) -> tuple[int]:  # noqa: N802
        self.gpu.memory.pop(ptr)
        return (OK,)

    cudaFreeHost = cudaFree  # noqa: N815

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple[int]:  # noqa: N802
        names = {1: "htod", 2: "dtoh", 3: "dtod"}
        self.gpu.enqueue(int(stream), f"copy {names[kind]} {nbytes}", lambda: ctypes.memmove(dst, src, nbytes))
        return (OK,)

    def cudaMemsetAsync(self, dst: int, value: int, nbytes: int, stream: int) -> tuple[int]:  # noqa: N802
        self.gpu.enqueue(int(stream), f"memset {nbytes}", lambda: ctypes.memset(dst, value, nbytes))
        return (OK,)

    # streams and events
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:  # noqa: N802
        handle = self.gpu.handle()
        self.gpu.streams[handle] = _Stream()
        return (OK, handle)

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:  # noqa: N802 - not capturable
        s = self.gpu.streams[int(stream)]
        if s.capture != NOT_CAPTURING:
            s.capture, self.gpu.last_error = INVALIDATED, CAPTURE_UNSUPPORTED
            return (CAPTURE_UNSUPPORTED,)
        return (OK,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:  # noqa: N802
        self.gpu.streams.pop(int(stream))
        return (OK,)

    def cudaEventCreate(self) -> tuple[int, int]:  # noqa: N802
        return (OK, self.gpu.handle())

    def cudaEventRecord(self, event: int, stream: int) -> tuple[int]:  # noqa: N802
        return (OK,)

    def cudaEventElapsedTime(self, start: int, end: int) -> tuple[int, float]:  # noqa: N802
        return (OK, 0.0)

    def cudaEventDestroy(self, event: int) -> tuple[int]:  # noqa: N802
        return (OK,)

    # capture and graphs
    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple[int]:  # noqa: N802
        s = self.gpu.streams[int(stream)]
        s.capture, s.recorded = ACTIVE, []
        return (OK,)

    def cudaStreamIsCapturing(self, stream: int) -> tuple[int, int]:  # noqa: N802
        return (OK, self.gpu.streams[int(stream)].capture)

    def cudaStreamEndCapture(self, stream: int) -> tuple[int, int | None]:  # noqa: N802
        s = self.gpu.streams[int(stream)]
        state, recorded = s.capture, s.recorded
        s.capture, s.recorded = NOT_CAPTURING, []
        if state != ACTIVE:
            return (CAPTURE_INVALIDATED, None)
        handle = self.gpu.handle()
        self.gpu.graphs[handle] = recorded
        return (OK, handle)

    def cudaGraphInstantiate(self, graph: int, flags: int) -> tuple[int, int]:  # noqa: N802
        return (OK, graph)  # the executable graph is the recorded list itself

    def cudaGraphLaunch(self, graph_exec: int, stream: int) -> tuple[int]:  # noqa: N802
        ops = self.gpu.graphs[graph_exec]

        def replay() -> None:
            for what, op in ops:
                op()
                self.gpu.log.append(f"replayed {what}")

        self.gpu.enqueue(int(stream), "graph launch", replay)
        return (OK,)

    def cudaGraphExecDestroy(self, graph_exec: int) -> tuple[int]:  # noqa: N802
        return (OK,)

    def cudaGraphDestroy(self, graph: int) -> tuple[int]:  # noqa: N802
        self.gpu.graphs.pop(graph, None)
        return (OK,)


# --------------------------------------------------------------------------- TensorRT


class _Enum:
    def __init__(self, name: str, value: int):
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


class _Engine:
    """An "engine": the bundle's ONNX graph (run by ONNX Runtime on CPU) and its I/O description."""

    def __init__(self, trt: ModuleType, description: dict[str, Any], gpu: Emulator):
        self.trt, self.gpu = trt, gpu
        self.graph = description["graph"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.log_severity_level = 3
        self.session = ort.InferenceSession(description["onnx"], options, providers=["CPUExecutionProvider"])
        self.io = {t["name"]: t for t in description["inputs"] + description["outputs"]}
        self.profile = description.get("profile", {})  # input -> {"min", "max"} (volume engines)
        self.inputs = [t["name"] for t in description["inputs"]]
        self.names = self.inputs + [t["name"] for t in description["outputs"]]
        self.num_io_tensors = len(self.names)
        self.device_memory_size_v2 = 1 << 20

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> Any:
        mode = self.trt.TensorIOMode
        return mode.INPUT if name in self.inputs else mode.OUTPUT

    def get_tensor_dtype(self, name: str) -> _Enum:
        return _Enum(_TRT_OF_NUMPY[self.io[name]["dtype"]], 0)

    def create_execution_context(self, strategy: Any) -> _Context:
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.batch: int | None = None

    def set_device_memory(self, ptr: int, nbytes: int) -> None:
        self.device_memory = (ptr, nbytes)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        return index == 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        shape = tuple(int(s) for s in shape)
        bounds = self.engine.profile.get(name)
        declared = self.engine.io[name]["shape"]
        if len(shape) != len(declared) or (
            bounds is not None and not all(lo <= s <= hi for lo, s, hi in zip(bounds["min"], shape, bounds["max"]))
        ):
            return False
        self.shapes[name] = shape
        if shape and isinstance(declared[0], str):
            self.batch = shape[0]
        return True

    def infer_shapes(self) -> list[str]:
        return []

    def update_device_memory_size_for_shapes(self) -> int:
        return 1 << 20

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        sizes: dict[str, int] = {}  # named axis -> size, from the input shapes set
        for given, shape in self.shapes.items():
            for d, s in zip(self.engine.io[given]["shape"], shape):
                if isinstance(d, str):
                    sizes[d] = s
        return tuple(sizes[d] if isinstance(d, str) else int(d) for d in self.engine.io[name]["shape"])

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream: int) -> bool:
        gpu = self.engine.gpu
        if gpu.fail_eager or (gpu.fail_capture and gpu.capturing(int(stream))):
            return False
        addresses = dict(self.addresses)  # what is bound now is what a graph bakes in
        shapes = {name: self.get_tensor_shape(name) for name in self.engine.names}

        def run() -> None:
            feeds = {
                name: gpu.view(addresses[name], shapes[name], self.engine.io[name]["dtype"]).copy()
                for name in self.engine.inputs
            }
            outputs = self.engine.session.run(None, feeds)
            for meta, value in zip(self.engine.session.get_outputs(), outputs):
                dtype = self.engine.io[meta.name]["dtype"]
                np.copyto(gpu.view(addresses[meta.name], shapes[meta.name], dtype), value)

        gpu.enqueue(int(stream), f"execute {self.engine.graph} batch {self.batch}", run)
        return True


def fake_tensorrt(gpu: Emulator) -> ModuleType:
    """A `tensorrt` module with what the backend touches (Runtime, ILogger, enums), over `gpu`."""
    trt = ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION  # type: ignore[attr-defined]

    class ILogger:  # noqa: N801 - TensorRT's name
        Severity = SimpleNamespace(ERROR=_Enum("ERROR", 1))

        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger: Any):
            self.logger = logger
            self.DLA_core = -1  # noqa: N815

        def deserialize_cuda_engine(self, data: bytes) -> _Engine:
            return _Engine(trt, json.loads(data), gpu)

    trt.ILogger = ILogger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.Builder = object  # type: ignore[attr-defined] - require_tensorrt checks it exists
    trt.TensorIOMode = SimpleNamespace(INPUT=_Enum("INPUT", 0), OUTPUT=_Enum("OUTPUT", 1))  # type: ignore[attr-defined]
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED=_Enum("USER_MANAGED", 2))  # type: ignore[attr-defined]
    return trt


def install(monkeypatch: Any) -> Emulator:
    """Plug an Emulator in where the backend imports cuda-python (ldseg.runtime.backends.tensorrt.cuda.runtime) and
    `tensorrt` (sys.modules), for one test (pytest's monkeypatch undoes it): the real
    TensorRTBackend code then runs over host memory and ONNX Runtime."""
    from ldseg.runtime.backends.tensorrt import cuda

    gpu = Emulator()
    cudart = FakeCudart(gpu)
    monkeypatch.setattr(cuda, "runtime", lambda: cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(gpu))
    return gpu


def _tensors(ts: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in ts]


def _engine_file(path: Path, graph: str, description: dict[str, Any], inputs: Any, outputs: Any) -> EngineFile:
    path.write_text(
        json.dumps({"graph": graph, **description, "inputs": _tensors(inputs), "outputs": _tensors(outputs)})
    )
    size, digest = file_digest(path)
    return EngineFile(graph, path.name, size, digest, 0.0, inputs, outputs, None)


def emulated_engine_set(
    folder: Path,
    bundle_dir: Path,
    max_batch: int = 4,
    *,
    volume_ops: bool = True,
    sample_engines: bool = True,
    max_input_grid: int = 512,
) -> Path:
    """An engine set for the emulator from a real bundle: each engine file is a JSON naming the
    bundle's ONNX graph (or a volume operation's or sample engine's float32 graph, saved beside it)
    and its I/O; engines.json is the real one (hashes, profiles, environment). The sample engines
    come with the volume engines for max_batch >= 2, as build-engine makes them."""
    bundle = load_bundle(bundle_dir)
    folder.mkdir(parents=True)
    engines, profiles = {}, {}
    for graph in ("encoder", "denoise_step", "decoder", "decoder_argmax"):
        info = bundle.graph(graph)
        onnx_file = str((bundle.path / info.file).resolve())
        engines[graph] = _engine_file(folder / f"{graph}{ENGINE_SUFFIX}", graph, {"onnx": onnx_file},
                                      info.inputs, info.outputs)  # fmt: skip
        profiles[graph] = batch_profile(info, max_batch)
    options = BuildOptions(precision=bundle.precision, workspace_bytes=None, optimization_level=None, dla_core=None)
    es = describe_engine_set(bundle, folder, EMULATED, profiles, engines, options, cache_path=None, seconds=0.0)
    if volume_ops:
        volume_engines, volume = emulated_volume_engines(folder, bundle.config.image_size, max_input_grid)
        if sample_engines and max_batch >= 2:
            engines_k, profiles_k = emulated_sample_engines(folder, bundle.config.image_size,
                                                            bundle.config.num_classes, max_batch)  # fmt: skip
            volume_engines, volume = {**volume_engines, **engines_k}, {**volume, **profiles_k}
        es = dataclasses.replace(
            es, volume_engines=volume_engines, volume_profiles=volume, max_input_grid=max_input_grid
        )
    write_engines_json(folder, es)
    return folder


def emulated_volume_engines(
    folder: Path, grid: tuple[int, ...], max_input_grid: int
) -> tuple[dict[str, EngineFile], dict[str, tuple[InputProfile, ...]]]:
    """The volume operations' emulated engines for a model grid, in `folder` (which exists): each
    float32 graph saved as ONNX, its engine JSON with the profile's bounds."""
    profiles = volume_profiles(grid, max_input_grid)
    return _small_engines(folder, {graph: make(FLOAT32) for graph, make in GRAPHS.items()}, profiles), profiles


def emulated_sample_engines(
    folder: Path, grid: tuple[int, ...], num_classes: int, max_samples: int
) -> tuple[dict[str, EngineFile], dict[str, tuple[InputProfile, ...]]]:
    """The sample engines (ldseg/runtime/sample_graphs.py, TensorRT's float32 flavour) in `folder`."""
    profiles = sample_profiles(grid, num_classes, max_samples)
    models = {graph: make(num_classes) for graph, make in SAMPLE_GRAPHS.items()}
    return _small_engines(folder, models, profiles), profiles


def _small_engines(
    folder: Path, models: dict[str, onnx.ModelProto], profiles: dict[str, tuple[InputProfile, ...]]
) -> dict[str, EngineFile]:
    """ldseg's own small graphs as emulated engines: each saved as ONNX, its engine JSON with the
    profile's bounds (enforced by set_input_shape) and the I/O engines.json records."""
    engines = {}
    for graph, model in models.items():
        onnx.save(model, folder / f"{graph}.onnx")
        bounds = {i.name: {"min": list(i.min), "max": list(i.max)} for i in profiles[graph]}
        description = {"onnx": str((folder / f"{graph}.onnx").resolve()), "profile": bounds}
        engines[graph] = _engine_file(folder / f"{graph}{ENGINE_SUFFIX}", graph, description, *tensors_of(model))
    return engines
