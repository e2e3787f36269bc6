"""Small engines of an engine set (the volume and sample engines) run one at a time on one stream,
over named slots: device buffers with pinned mirrors, kept and grown across calls, so a folder of
same-shaped volumes allocates once. A slot may also be an address the caller owns (`at`: a sample
the backend kept, a result's buffer), bound in place for one operation.

Memory: one activation buffer for all the runner's contexts (they run one after another under a
lock), sized to the shapes in use (compat.activation_size_for_shapes) and grown when larger shapes
come. A cudaMalloc that fails leaves as DeviceMemoryError (the run path then works on the CPU).

NOT RUN on TensorRT or a GPU: executed on the emulated CUDA/TensorRT layer (tests/tensorrt/emulator.py).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from ldseg.errors import BackendUnavailable
from ldseg.runtime.artifacts.engines import EngineSet
from ldseg.runtime.backends.tensorrt import compat as trt_compat
from ldseg.runtime.backends.tensorrt import cuda
from ldseg.runtime.volume_ops import DeviceMemoryError, DeviceStepUnavailable

if TYPE_CHECKING:
    import tensorrt as trt


class _Slot:
    """A device buffer and its pinned mirror, grown on demand, viewed at the shape in use."""

    def __init__(self) -> None:
        self.device: cuda.DeviceBuffer | None = None
        self.host: cuda.PinnedArray | None = None
        self.shape: tuple[int, ...] = ()
        self.dtype = np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return max(int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize, 1)

    def fit(self, shape: Sequence[int], dtype: Any) -> int:
        """Device pointer of a buffer that holds `shape` x `dtype` (reallocated only to grow)."""
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        if self.device is None or self.device.nbytes < self.nbytes:
            if self.device is not None:
                self.device.free()
            self.device = None
            self.device = cuda.DeviceBuffer(self.nbytes)
        return self.device.ptr

    def mirror(self) -> np.ndarray:
        """The pinned host array at the slot's shape (allocated only to grow)."""
        if self.host is None or self.host.nbytes < self.nbytes:
            if self.host is not None:
                self.host.free()
            self.host = None
            self.host = cuda.PinnedArray((self.nbytes,), np.uint8)
        raw = (ctypes.c_ubyte * self.nbytes).from_address(self.host.ptr)
        count = int(np.prod(self.shape, dtype=np.int64))
        return np.frombuffer(memoryview(raw), dtype=self.dtype, count=count).reshape(self.shape)

    def address(self) -> int:
        assert self.device is not None
        return self.device.ptr

    def free(self) -> None:
        for buffer in (self.device, self.host):
            if buffer is not None:
                buffer.free()
        self.device = self.host = None


class _At(_Slot):
    """(shape, dtype) at an address the caller owns, for one operation (`EngineRunner.at`)."""

    def __init__(self, ptr: int, shape: Sequence[int], dtype: Any):
        super().__init__()
        self.ptr, self.shape, self.dtype = ptr, tuple(int(s) for s in shape), np.dtype(dtype)

    def fit(self, shape: Sequence[int], dtype: Any) -> int:
        wanted = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if tuple(int(s) for s in shape) != self.shape or np.dtype(dtype) != self.dtype:
            raise ValueError(f"an output of {tuple(shape)} {np.dtype(dtype)} ({wanted} bytes) bound to "
                             f"{self.shape} {self.dtype}")  # fmt: skip
        return self.ptr

    def address(self) -> int:
        return self.ptr

    def free(self) -> None:  # the caller owns the memory
        pass


class EngineRunner:
    """Engines of `engine_set` on GPU `index`, made on first use and run on `stream` (one of its
    own, made on first use, when none is given)."""

    def __init__(
        self,
        engine_set: EngineSet,
        load: Callable[[str], trt.ICudaEngine],
        index: int,
        stream: cuda.Stream | None = None,
    ):
        self.engine_set, self._load, self._index = engine_set, load, index
        self.where = f"cuda:{index}"
        self._lock = threading.Lock()
        self._stream, self._own_stream = stream, stream is None
        self._engines: dict[str, trt.ICudaEngine] = {}
        self._contexts: dict[str, trt.IExecutionContext] = {}
        self._activation = _Slot()
        self._slots: dict[str, _Slot] = {}

    @contextmanager
    def device(self) -> Iterator[None]:
        """One operation at a time, on this GPU (the calling thread may be new to it); a failed
        allocation leaves as DeviceMemoryError. The caller's addresses are forgotten at the end:
        each operation ends with a synchronization, so they have been read."""
        with self._lock:
            try:
                cuda.set_device(self._index)
                if self._stream is None:
                    self._stream = cuda.Stream()
                yield
            except cuda.CudaError as exc:
                if "MemoryAllocation" not in str(exc):
                    raise
                raise DeviceMemoryError.of(self.where, exc) from exc
            finally:
                for key in [k for k, slot in self._slots.items() if isinstance(slot, _At)]:
                    del self._slots[key]

    @property
    def stream(self) -> cuda.Stream:
        assert self._stream is not None
        return self._stream

    def at(self, key: str, ptr: int, shape: Sequence[int], dtype: Any) -> str:
        """Slot `key` bound to the caller's memory for this operation; returns the key."""
        self._slots[key] = _At(ptr, shape, dtype)
        return key

    def slot(self, key: str) -> _Slot:
        return self._slots.setdefault(key, _Slot())

    def upload(self, key: str, array: np.ndarray, dtype: Any = None) -> None:
        """Host array -> its slot on the device, through the slot's pinned mirror (converted to
        `dtype` there: an int16 scan goes up as the float32 the graph reads)."""
        self._put(key, array.shape, dtype or array.dtype, array)

    def fill(self, key: str, shape: Sequence[int], dtype: Any, value: float) -> None:
        """A slot of `shape` set to `value` on the device, filled in its pinned mirror (no host array)."""
        self._put(key, shape, dtype, value)

    def zero(self, key: str, shape: Sequence[int], dtype: Any) -> None:
        """A slot of `shape` set to zero bytes on the device (no host memory at all)."""
        ptr = self.slot(key).fit(shape, dtype)
        self.stream.memset(ptr, 0, self._slots[key].nbytes)

    def _put(self, key: str, shape: Sequence[int], dtype: Any, values: np.ndarray | float) -> None:
        slot = self.slot(key)
        ptr = slot.fit(shape, dtype)
        self.stream.synchronize()  # the mirror may still feed an earlier enqueued copy
        np.copyto(slot.mirror(), values, casting="unsafe")
        assert slot.host is not None
        self.stream.copy_htod(ptr, slot.host.ptr, slot.nbytes)

    def download(self, key: str) -> np.ndarray:
        slot = self._slots[key]
        assert slot.device is not None
        mirror = slot.mirror()
        assert slot.host is not None
        self.stream.copy_dtoh(slot.host.ptr, slot.device.ptr, slot.nbytes)
        self.stream.synchronize()
        return mirror.copy()

    def _context(self, graph: str) -> trt.IExecutionContext:
        if graph not in self._contexts:
            import tensorrt as trt

            engine = self._engines[graph] = self._load(graph)
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None or not context.set_optimization_profile_async(0, self.stream.ptr):
                raise BackendUnavailable(f"TensorRT could not make an execution context for {graph}")
            self._contexts[graph] = context
        return self._contexts[graph]

    def run(self, graph: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
        """Enqueue `graph` on the stream: tensor name -> slot key, inputs already uploaded; the
        output slots are sized from the shapes TensorRT infers."""
        context = self._context(graph)
        engine = self._engines[graph]
        dtypes = {t.name: t.dtype for t in self.engine_set.volume_engines[graph].outputs}
        for name, key in inputs.items():
            if not context.set_input_shape(name, self._slots[key].shape):
                raise DeviceStepUnavailable(
                    f"{self.where}: TensorRT's {graph} engine refused {name} of shape {self._slots[key].shape}"
                )
        size = trt_compat.activation_size_for_shapes(context, engine)
        trt_compat.set_device_memory(context, self._activation.fit((size,), np.uint8), size)
        for name, key in outputs.items():
            self.slot(key).fit(tuple(context.get_tensor_shape(name)), dtypes[name])
        for name, key in {**inputs, **outputs}.items():
            if not context.set_tensor_address(name, self._slots[key].address()):
                raise BackendUnavailable(f"{graph}: TensorRT refused the address of {name}")
        if not context.execute_async_v3(self.stream.ptr):
            raise BackendUnavailable(f"execute_async_v3 of {graph} returned false")

    def release(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.synchronize()
            for slot in [*self._slots.values(), self._activation]:
                slot.free()
            self._slots.clear()
            self._contexts.clear()
            self._engines.clear()
            if self._stream is not None and self._own_stream:  # a stream it was given stays its owner's
                self._stream.destroy()
                self._stream = None
