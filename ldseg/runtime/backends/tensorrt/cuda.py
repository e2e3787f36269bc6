"""A thin, checked layer over cuda-python's runtime API (what the TensorRT backend needs, no more).

cuda-python returns `(error, *values)` from every call instead of raising; `check` turns a
non-success code into a CudaError that names the call and the CUDA error, so no failure is
silently dropped. Buffers are plain device pointers (ints) from cudaMalloc (256-byte aligned by
the CUDA allocator) and pinned host memory from cudaMallocHost, viewed as NumPy arrays so that
copies can be captured into a CUDA graph (pageable host memory cannot be).

Import path: `from cuda.bindings import runtime` (cuda-python >= 12.6; `from cuda import cudart`
was removed in 13), with the old module as a fallback for older installs.

Nothing here has run on a GPU: the development machines have none (see README).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ldseg.errors import BackendUnavailable

ALIGNMENT = 256  # bytes: what TensorRT asks of every I/O address (cudaMalloc gives at least this)


class CudaError(BackendUnavailable):
    """A CUDA runtime call failed (no device, driver too old, out of memory, launch failure...)."""


@functools.cache
def runtime() -> Any:
    """cuda-python's runtime module, or BackendUnavailable saying how to get it."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailable(
                "cuda-python is not installed (the TensorRT backend needs it): pip install -e '.[tensorrt]'"
            ) from exc
    return cudart


def _error_name(cudart: Any, err: Any) -> str:
    try:
        _, name = cudart.cudaGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - only used to word an error that is being raised anyway
        return str(err)


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python `(err, *values)` result: raise CudaError unless err is cudaSuccess.

    Returns None for `(err,)`, the value for `(err, value)`, and the tuple of values otherwise.
    """
    cudart = runtime()
    err, values = (result[0], tuple(result[1:])) if isinstance(result, tuple) else (result, ())
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(f"CUDA call {what} failed: {_error_name(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def clear_last_error() -> str | None:
    """Read and reset the last (non-sticky) CUDA error, e.g. after a failed capture; its name or None."""
    cudart = runtime()
    (err,) = cudart.cudaGetLastError()
    return None if err == cudart.cudaError_t.cudaSuccess else _error_name(cudart, err)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "major.minor", e.g. "8.7" (Orin), "9.0" (H100)
    total_memory: int


def device_count() -> int:
    """GPUs the CUDA runtime sees; CudaError with the real error name (cudaErrorNoDevice,
    cudaErrorInsufficientDriver...) when it cannot tell, so "no GPU" is never a guess."""
    return int(check(runtime().cudaGetDeviceCount(), "cudaGetDeviceCount"))


def gpu_info(index: int = 0) -> GpuInfo:
    """Name and compute capability of GPU `index`; BackendUnavailable if there is no such GPU."""
    count = device_count()
    if index >= count:
        seen = "no CUDA GPU is visible" if count == 0 else f"only {count} CUDA GPU(s) are visible"
        raise BackendUnavailable(f"GPU {index} requested but {seen} (driver loaded? CUDA_VISIBLE_DEVICES?)")
    props = check(runtime().cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    raw = props.name
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return GpuInfo(index, name.strip(), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def memory_info() -> tuple[int, int]:
    """(free, total) bytes of the current device (cudaMemGetInfo)."""
    free, total = check(runtime().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def set_device(index: int) -> None:
    check(runtime().cudaSetDevice(index), f"cudaSetDevice({index})")


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc: 256-byte aligned). `ptr` is what TensorRT binds."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr: int = int(check(runtime().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            check(runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedArray:
    """A NumPy array in page-locked host memory: the only host memory a captured copy may touch."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any] | type):
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = max(int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize, 1)
        self.ptr: int = int(check(runtime().cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))
        raw = (ctypes.c_ubyte * self.nbytes).from_address(self.ptr)
        count = int(np.prod(self.shape, dtype=np.int64))
        self.array: np.ndarray = np.frombuffer(memoryview(raw), dtype=self.dtype, count=count).reshape(self.shape)

    def free(self) -> None:
        if self.ptr:
            self.array = np.empty(0, dtype=self.dtype)  # drop the view before the memory goes
            check(runtime().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class Stream:
    """A non-blocking stream (TensorRT must not be enqueued on the legacy default stream)."""

    def __init__(self) -> None:
        cudart = runtime()
        self.handle: Any = check(
            cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def copy_htod(self, dst: int, src: int, nbytes: int) -> None:
        cudart = runtime()
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.handle), "cudaMemcpyAsync(host->device)")

    def copy_dtoh(self, dst: int, src: int, nbytes: int) -> None:
        cudart = runtime()
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.handle), "cudaMemcpyAsync(device->host)")

    def copy_dtod(self, dst: int, src: int, nbytes: int) -> None:
        cudart = runtime()
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.handle), "cudaMemcpyAsync(device->device)")

    def memset(self, dst: int, value: int, nbytes: int) -> None:
        check(runtime().cudaMemsetAsync(dst, value, nbytes, self.handle), "cudaMemsetAsync")

    def destroy(self) -> None:
        if self.handle is not None:
            check(runtime().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class Event:
    def __init__(self) -> None:
        self.handle: Any = check(runtime().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(runtime().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def ms_since(self, start: Event) -> float:
        return float(check(runtime().cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))

    def destroy(self) -> None:
        if self.handle is not None:
            check(runtime().cudaEventDestroy(self.handle), "cudaEventDestroy")
            self.handle = None


class GraphCapture:
    """Capture of everything enqueued on `stream` into an instantiated CUDA graph.

    Thread-local mode (as trtexec does): an unsafe CUDA call from another thread cannot break it.
    `end()` returns the launchable graph, or None with `reason` set when the capture failed: the
    capture was invalidated, ending it failed, or instantiation failed; the CUDA error is cleared
    so the stream can run eagerly afterwards.
    """

    def __init__(self, stream: Stream):
        self.stream = stream
        self.reason: str | None = None
        cudart = runtime()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")

    def still_active(self) -> bool:
        cudart = runtime()
        err, status = cudart.cudaStreamIsCapturing(self.stream.handle)
        active = cudart.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive
        return bool(err == cudart.cudaError_t.cudaSuccess and status == active)

    def end(self, enqueued_ok: bool, failure: str | None = None) -> CudaGraph | None:
        cudart = runtime()
        active = self.still_active()
        err, graph = cudart.cudaStreamEndCapture(self.stream.handle)  # always end, even on failure
        if failure is None and not enqueued_ok:
            failure = "an enqueue during capture returned false"
        if failure is None and not active:
            failure = "the capture was invalidated (a call in the sequence is not capturable)"
        if failure is None and err != cudart.cudaError_t.cudaSuccess:
            failure = f"cudaStreamEndCapture failed: {_error_name(cudart, err)}"
        graph_exec = None
        if failure is None:
            err_i, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
            if err_i != cudart.cudaError_t.cudaSuccess:
                failure = f"cudaGraphInstantiate failed: {_error_name(cudart, err_i)}"
                graph_exec = None
        if failure is not None:
            if err == cudart.cudaError_t.cudaSuccess and graph is not None:
                cudart.cudaGraphDestroy(graph)  # best effort: a failed capture leaves nothing to run
            sticky = clear_last_error()
            self.reason = failure + (f" (CUDA error {sticky}, cleared)" if sticky else "")
            return None
        return CudaGraph(graph, graph_exec)


class CudaGraph:
    def __init__(self, graph: Any, graph_exec: Any):
        self.graph, self.graph_exec = graph, graph_exec

    def launch(self, stream: Stream) -> None:
        check(runtime().cudaGraphLaunch(self.graph_exec, stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        cudart = runtime()
        if self.graph_exec is not None:
            check(cudart.cudaGraphExecDestroy(self.graph_exec), "cudaGraphExecDestroy")
            self.graph_exec = None
        if self.graph is not None:
            check(cudart.cudaGraphDestroy(self.graph), "cudaGraphDestroy")
            self.graph = None


def cuda_runtime_problem(index: int = 0) -> str | None:
    """Why cuda-python (the TensorRT route) cannot use GPU `index` (None: it can)."""
    try:
        count = device_count()
    except BackendUnavailable as exc:  # cuda-python missing, or cudaGetDeviceCount failed
        return str(exc)
    if index >= count:
        return f"GPU {index} requested, the CUDA runtime sees {count} GPU(s) (CUDA_VISIBLE_DEVICES?)"
    return None
