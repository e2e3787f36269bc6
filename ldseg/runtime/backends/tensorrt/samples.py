"""The TensorRT backend's one sample kept on its GPU (ldseg/runtime/samples.py): for K = 1 (a plain
`ldseg-run`, a folder, the service) the decoder's probabilities are copied device to device into a
buffer the result owns (the decoder's own output buffer is overwritten by the next volume), and
TrtVolumeOps reads them class by class at their device address: the full-resolution probabilities
never go down to the host and back up (knee: 50 MB each way), and no host argmax runs. The votes of
one sample are the argmax of its probabilities, which only QC reads: made on the host from the mean
when asked for (first maximum, as `copy_out` makes the labels).

K > 1 stays on the host path (`device_samples` returns None): the sum, the mean and the maps would
need engines of their own in the set (ONNX Runtime runs them as ldseg/runtime/sample_graphs.py, in
float64 where TensorRT has none), which build-engine does not make.

The copy is followed by a synchronization of the backend's stream (the volume ops run on another
stream); the buffer is freed when the last array that views it goes. NOT RUN on TensorRT or a GPU:
executed on the emulated CUDA/TensorRT layer (tests/tensorrt/emulator.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from ldseg.runtime.backends.tensorrt import cuda
from ldseg.runtime.samples import DeviceArray, SampleResult, host


def _free(ptr: int) -> None:
    cuda.check(cuda.runtime().cudaFree(ptr), "cudaFree")


class TrtDeviceArray(DeviceArray):
    """(shape, dtype) at byte `offset` of a device buffer owned by the result (freed with it)."""

    def __init__(self, buffer: cuda.DeviceBuffer, shape: Sequence[int], dtype: Any, gpu: int, offset: int = 0):
        self.buffer, self.gpu, self.offset = buffer, gpu, offset
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.where = f"cuda:{gpu}"

    @classmethod
    def owning(cls, buffer: cuda.DeviceBuffer, shape: Sequence[int], dtype: Any, gpu: int) -> TrtDeviceArray:
        array = cls(buffer, shape, dtype, gpu)
        # Freed once no array views the buffer any more; not at interpreter exit (the context goes then).
        weakref.finalize(buffer, _free, buffer.ptr).atexit = False
        return array

    @property
    def ptr(self) -> int:
        return self.buffer.ptr + self.offset

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def _download(self) -> np.ndarray:
        cuda.set_device(self.gpu)
        pinned, stream = cuda.PinnedArray(self.shape, self.dtype), cuda.Stream()
        try:
            stream.copy_dtoh(pinned.ptr, self.ptr, self.nbytes)
            stream.synchronize()
            return pinned.array.copy()
        finally:
            stream.destroy()
            pinned.free()

    def _item(self, index: int) -> Self:
        plane = self.nbytes // self.shape[0]
        return type(self)(self.buffer, self.shape[1:], self.dtype, self.gpu, self.offset + index * plane)


class _OneSampleVotes(DeviceArray):
    """The votes of one sample: the argmax of its probabilities, made on the host when read."""

    def __init__(self, mean: TrtDeviceArray):
        self.mean = mean
        self.shape = (1, *mean.shape[1:])
        self.where = mean.where

    def _download(self) -> np.ndarray:
        return host(self.mean).argmax(axis=0)[None].astype(np.uint8)

    def _item(self, index: int) -> Self:
        raise IndexError("one sample's votes: index the host array (np.asarray)")


class TrtOneSample:
    """Backend.sample's accumulator for K = 1 on the GPU (ldseg/runtime/samples.py's DeviceSamples)."""

    def __init__(self, stream: cuda.Stream, gpu: int):
        self.stream, self.gpu = stream, gpu
        self.mean: TrtDeviceArray | None = None

    def fetch(self, plan: Any) -> tuple[None, Any]:
        """The decoder's probabilities slot (1, C, *grid), where the decoder wrote them."""
        return None, plan.b.probs

    def add(self, start: int, labels: None, probabilities: Any) -> None:
        assert start == 0 and self.mean is None, "TrtOneSample keeps one sample"
        shape = tuple(probabilities.shape)[1:]  # (C, *grid) of the (1, C, *grid) slot
        kept = cuda.DeviceBuffer(probabilities.nbytes)
        self.mean = TrtDeviceArray.owning(kept, shape, np.float32, self.gpu)
        self.stream.copy_dtod(kept.ptr, probabilities.buffer.ptr, probabilities.nbytes)
        self.stream.synchronize()  # complete before the volume ops' stream reads it

    def result(self, stage_ms: dict[str, float], chunk: int) -> SampleResult:
        assert self.mean is not None
        return SampleResult(mean=self.mean, votes=_OneSampleVotes(self.mean), stage_ms=stage_ms, chunk=chunk)
