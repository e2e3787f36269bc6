"""TensorRT's volume operations (ldseg/runtime/volume_ops.py): the float32 graphs of
ldseg/runtime/volume_graphs.py, built into the engine set by `ldseg-export build-engine`, run on a
stream of their own (the run path calls them from its reading and writing threads while the model
runs on the backend's stream).

Float32, not scipy's float64: TensorRT has no float64 tensors. On the shared knee cases 1-4 the
float32 graphs, run by ONNX Runtime on the CPU, give the float64 CPU path's labels exactly (0 of 4.0M
voxels differ per case) and model-grid images within 1.2e-7 (`python benchmarks/volume_ops_cpu.py
--float32`); TensorRT may fuse the blend's multiply-add and round differently, which nothing here has
measured. The volume goes up as float32 (TensorRT has no int16 tensors; an int16 scan converts
exactly); only uint8 labels and the float maps asked for come back, through pinned memory. A
sample the backend kept on this GPU (samples.py, K = 1) is read class by class at its own address.

Memory: one activation buffer for the three contexts (they run one after another under a lock, on
one stream), sized to the shapes in use (compat.activation_size_for_shapes) and grown when a larger
volume comes; device and pinned buffers per tensor, kept and grown likewise, so a folder of
same-shaped volumes allocates once. A volume outside the engines' input-grid range raises
DeviceStepUnavailable and a cudaMalloc that fails DeviceMemoryError: the run path then resamples
that volume on the CPU.

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
from ldseg.runtime.backends.tensorrt.samples import TrtDeviceArray
from ldseg.runtime.samples import ModelGridArray, host
from ldseg.runtime.volume_graphs import FLOAT32
from ldseg.runtime.volume_ops import DeviceMemoryError, DeviceStepUnavailable, axis_feeds

if TYPE_CHECKING:
    import tensorrt as trt

_TO_MODEL = (2, 1, 0)
_CONSTANT = "cannot min-max standardize a constant (or NaN) image"  # ldseg.io.preprocess's words
_FEEDS = {"index_dtype": FLOAT32.index_dtype, "weight_dtype": FLOAT32.weight_dtype}


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


class _Kept(_Slot):
    """An input read where the backend left it (a TrtDeviceArray: one class of a kept sample)."""

    def __init__(self, array: TrtDeviceArray):
        super().__init__()
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def address(self) -> int:
        return self.array.ptr

    def free(self) -> None:  # the array's result owns the memory
        pass


class TrtVolumeOps:
    """The volume engines of an engine set on GPU `index`; engines and contexts made on first use."""

    def __init__(self, engine_set: EngineSet, load: Callable[[str], trt.ICudaEngine], index: int):
        self.engine_set, self._load, self._index = engine_set, load, index
        self.where = f"cuda:{index}"
        self.grid = tuple(int(s) for s in engine_set.config.image_size)
        self.max_input_grid = engine_set.max_input_grid
        self._lock = threading.Lock()
        self._stream: cuda.Stream | None = None
        self._engines: dict[str, trt.ICudaEngine] = {}
        self._contexts: dict[str, trt.IExecutionContext] = {}
        self._activation = _Slot()
        self._slots: dict[str, _Slot] = {}

    def describe(self) -> str:
        return f"TensorRT engines on {self.where} (float32; input grid <= {self.max_input_grid} per axis)"

    # ------------------------------------------------------------------ the three operations

    def to_model_grid(self, array_nib: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        target = tuple(int(s) for s in grid)
        if array_nib.ndim != 3 or target != self.grid:
            raise ValueError(f"to_model_grid: need a 3D array and the engines' grid {self.grid}, got "
                             f"{array_nib.shape} and {target}")  # fmt: skip
        self._check_range(array_nib.shape)
        with self._device():
            self._upload("volume", array_nib, np.float32)
            feeds = axis_feeds(array_nib.shape[::-1], target, **_FEEDS)
            for name, array in feeds.items():
                self._upload(f"pre:{name}", array)
            self._run("volume_to_model_grid", {"volume": "volume", **{n: f"pre:{n}" for n in feeds}},
                      {"image": "image", "peak": "peak", "total": "total"})  # fmt: skip
            image, peak, total = (self._download(k) for k in ("image", "peak", "total"))
        if not (float(peak) > 0 and np.isfinite(total)):
            raise ValueError(_CONSTANT)
        return image

    def labels_on_input_grid(self, probabilities: ModelGridArray, input_shape_nib: Sequence[int]) -> np.ndarray:
        probabilities = self._here(probabilities)
        if probabilities.ndim != 4 or len(input_shape_nib) != 3 or probabilities.shape[1:] != self.grid:
            raise ValueError(
                f"need probs (C, *{self.grid}) and a 3D input shape, got {probabilities.shape}, "
                f"{tuple(input_shape_nib)}"
            )
        if probabilities.shape[0] > 256:
            raise ValueError(f"at most 256 classes fit uint8 labels, got {probabilities.shape[0]}")
        self._check_range(input_shape_nib)
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        with self._device():
            feeds = self._upload_feeds(probabilities.shape[1:], target)
            # Ping-pong (best, index) pairs on the device; the first class beats -inf everywhere.
            self._fill("best0", target, np.float32, -np.inf)
            self._fill("index0", target, np.int32, 0)
            for c in range(probabilities.shape[0]):
                now, after = c % 2, 1 - c % 2
                values = self._put_values(probabilities[c])
                self._upload("klass", np.array(c, np.int32))
                inputs = {"values": values, **feeds, "best": f"best{now}", "index": f"index{now}", "klass": "klass"}
                outputs = {"best_out": f"best{after}", "index_out": f"index{after}", "labels": "labels"}
                self._run("volume_class_step", inputs, outputs)
            labels = self._download("labels")
        return np.ascontiguousarray(labels.transpose(_TO_MODEL))

    def map_on_input_grid(self, values: ModelGridArray, input_shape_nib: Sequence[int]) -> np.ndarray:
        values = self._here(values)
        if values.shape != self.grid or len(input_shape_nib) != 3:
            raise ValueError(
                f"need a map of {self.grid} and a 3D input shape, got {values.shape}, {tuple(input_shape_nib)}"
            )
        self._check_range(input_shape_nib)
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        with self._device():
            feeds = self._upload_feeds(values.shape, target)
            self._run("volume_map", {"values": self._put_values(values), **feeds}, {"result": "result"})
            return self._download("result")

    # ------------------------------------------------------------------ plumbing

    def _check_range(self, shape: Sequence[int]) -> None:
        if not all(1 <= int(s) <= self.max_input_grid for s in shape):
            raise DeviceStepUnavailable(
                f"{self.where}: a {tuple(int(s) for s in shape)} volume is outside the TensorRT volume engines' "
                f"range (1..{self.max_input_grid} voxels per axis; rebuild with --max-input-grid)"
            )

    @contextmanager
    def _device(self) -> Iterator[None]:
        """One operation at a time, on this GPU (the calling thread may be new to it); a failed
        allocation leaves as DeviceMemoryError."""
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
            finally:  # every operation ends with a download (a sync): a kept input has been read
                self._slots.pop("kept", None)

    @property
    def stream(self) -> cuda.Stream:
        assert self._stream is not None
        return self._stream

    def _here(self, array: ModelGridArray) -> np.ndarray | TrtDeviceArray:
        """A sample the backend kept on this GPU as it is, anything else on the host."""
        if isinstance(array, TrtDeviceArray) and array.gpu == self._index:
            return array
        return host(array)

    def _put_values(self, values: np.ndarray | TrtDeviceArray) -> str:
        """The slot key a graph's `values` input reads: a kept array in place, a host one uploaded."""
        if isinstance(values, TrtDeviceArray):
            self._slots["kept"] = _Kept(values)
            return "kept"
        self._upload("values", values, np.float32)
        return "values"

    def _slot(self, key: str) -> _Slot:
        return self._slots.setdefault(key, _Slot())

    def _upload_feeds(self, sizes_in: Sequence[int], sizes_out: Sequence[int]) -> dict[str, str]:
        feeds = axis_feeds(sizes_in, sizes_out, **_FEEDS)
        for name, array in feeds.items():
            self._upload(f"post:{name}", array)
        return {name: f"post:{name}" for name in feeds}

    def _upload(self, key: str, array: np.ndarray, dtype: Any = None) -> None:
        """Host array -> its slot on the device, through the slot's pinned mirror (converted to
        `dtype` there: an int16 scan goes up as the float32 the graph reads)."""
        self._put(key, array.shape, dtype or array.dtype, array)

    def _fill(self, key: str, shape: Sequence[int], dtype: Any, value: float) -> None:
        """A slot of `shape` set to `value` on the device, filled in its pinned mirror (no host array)."""
        self._put(key, shape, dtype, value)

    def _put(self, key: str, shape: Sequence[int], dtype: Any, values: np.ndarray | float) -> None:
        slot = self._slot(key)
        ptr = slot.fit(shape, dtype)
        self.stream.synchronize()  # the mirror may still feed an earlier enqueued copy
        np.copyto(slot.mirror(), values, casting="unsafe")
        assert slot.host is not None
        self.stream.copy_htod(ptr, slot.host.ptr, slot.nbytes)

    def _download(self, key: str) -> np.ndarray:
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

    def _run(self, graph: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
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
            self._slot(key).fit(tuple(context.get_tensor_shape(name)), dtypes[name])
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
            if self._stream is not None:
                self._stream.destroy()
                self._stream = None
