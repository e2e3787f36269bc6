"""The TensorRT backend's K samples kept on its GPU (ldseg/runtime/samples.py), for its volume
engines (volume.py) to read in place: the full-resolution probabilities never go down to the host
and back up (knee: 50 MB each way), and no host argmax runs.

- K = 1 (a plain `ldseg-run`, a folder, the service): the decoder's probabilities are copied device
  to device into a buffer the result owns (the decoder's output buffer is overwritten by the next
  volume). The votes of one sample are the argmax of its probabilities, which only QC reads: made on
  the host from the mean when asked for (first maximum, as `copy_out` makes the labels).
- K > 1, where the engine set has the sample engines (build-engine makes them beside the volume
  engines when it builds for more than one sample): ldseg/runtime/sample_graphs.py's float32 graphs.
  Each sample is added to a running sum (two buffers the backend keeps, zeroed on the device for
  the first sample) and its labels written into the result's votes; the mean is the sum over K; the
  confidence and vote-entropy maps are made by the volume engines' runner when the run asks for them.
  An engine set without them (built before, or for one sample) keeps K > 1 on the host path.

Arithmetic: the sums, the mean, the votes and the confidence are the host path's bit for bit if
TensorRT's float32 addition and division round as IEEE does (nothing here has measured that on
TensorRT); the entropy divides by log(C) in float32 (no float64): within an ulp or two of the host's.

Buffers: what a result owns comes from `KeptBuffers`, a pool of device buffers by size: a buffer
returns to it when the last array that views it goes, and the next volume takes it again (a
cudaFree per volume would synchronize the whole device from the writer thread); the pool is freed
with the backend. The accumulation runs on the backend's stream and ends with its synchronization
(the volume engines run on another stream). NOT RUN on TensorRT or a GPU: executed on the emulated
CUDA/TensorRT layer (tests/tensorrt/emulator.py).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any, Protocol, Self

import numpy as np

from ldseg.runtime.backends.tensorrt import cuda
from ldseg.runtime.backends.tensorrt.engine_runner import EngineRunner
from ldseg.runtime.samples import DeviceArray, SampleResult, host

# What a set needs to keep K > 1 samples on the GPU: sample_graphs.SAMPLE_GRAPHS's names (a test holds
# them equal), written out so that running an engine set never imports onnx.
SAMPLE_ENGINES = ("sample_accumulate", "sample_mean", "sample_class_max", "sample_entropy")


class _Lease:
    """A pooled buffer's address, held by the arrays that view it; the buffer goes back to its
    pool when the last of them goes."""

    def __init__(self, ptr: int):
        self.ptr = ptr


class TrtDeviceArray(DeviceArray):
    """(shape, dtype) at byte `offset` of a kept buffer (its lease keeps it out of the pool)."""

    def __init__(self, lease: _Lease, shape: Sequence[int], dtype: Any, gpu: int, offset: int = 0):
        self.lease, self.gpu, self.offset = lease, gpu, offset
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.where = f"cuda:{gpu}"

    @property
    def ptr(self) -> int:
        return self.lease.ptr + self.offset

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
        return type(self)(self.lease, self.shape[1:], self.dtype, self.gpu, self.offset + index * plane)


class KeptBuffers:
    """Device buffers for kept results, by size: taken by `array`, back when the array's last view
    goes, freed at `release` (a buffer still viewed then is freed when its last view goes). Holds at
    most as many as were alive at once (the run path keeps a volume or two in flight)."""

    def __init__(self, gpu: int):
        self.gpu = gpu
        self._idle: dict[int, list[cuda.DeviceBuffer]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.allocated = 0  # buffers made (the tests check the reuse)

    def array(self, shape: Sequence[int], dtype: Any) -> TrtDeviceArray:
        nbytes = max(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize, 1)
        with self._lock:
            idle = self._idle.get(nbytes)
            buffer = idle.pop() if idle else None
            self.allocated += buffer is None
        if buffer is None:
            buffer = cuda.DeviceBuffer(nbytes)
        lease = _Lease(buffer.ptr)
        weakref.finalize(lease, self._give, buffer).atexit = False  # at exit the CUDA context goes first
        return TrtDeviceArray(lease, shape, dtype, self.gpu)

    def idle(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def _give(self, buffer: cuda.DeviceBuffer) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(buffer.nbytes, []).append(buffer)
                return
        buffer.free()

    def release(self) -> None:
        with self._lock:
            self._closed = True
            idle = [b for buffers in self._idle.values() for b in buffers]
            self._idle.clear()
        for buffer in idle:
            buffer.free()


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

    def __init__(self, stream: cuda.Stream, kept: KeptBuffers):
        self.stream, self.kept = stream, kept
        self.mean: TrtDeviceArray | None = None

    def fetch(self, plan: Any) -> tuple[None, Any]:
        """The decoder's probabilities slot (1, C, *grid), where the decoder wrote them."""
        return None, plan.b.probs

    def add(self, start: int, labels: None, probabilities: Any) -> None:
        assert start == 0 and self.mean is None, "TrtOneSample keeps one sample"
        self.mean = self.kept.array(tuple(probabilities.shape)[1:], np.float32)  # (C, *grid) of (1, C, *grid)
        self.stream.copy_dtod(self.mean.ptr, probabilities.buffer.ptr, probabilities.nbytes)
        self.stream.synchronize()  # complete before the volume ops' stream reads it

    def result(self, stage_ms: dict[str, float], chunk: int) -> SampleResult:
        assert self.mean is not None
        return SampleResult(mean=self.mean, votes=_OneSampleVotes(self.mean), stage_ms=stage_ms, chunk=chunk)


class SampleMaps(Protocol):
    """What makes a kept result's maps (TrtVolumeOps, on the volume engines' stream)."""

    def class_max(self, mean: TrtDeviceArray) -> TrtDeviceArray: ...

    def entropy(self, votes: TrtDeviceArray, num_classes: int) -> TrtDeviceArray: ...


class TrtSampleResult(SampleResult):
    """A SampleResult whose mean and votes are TrtDeviceArrays; its maps are made by the engines."""

    mean: TrtDeviceArray
    votes: TrtDeviceArray
    maps: SampleMaps

    def confidence(self) -> TrtDeviceArray:
        return self.maps.class_max(self.mean)

    def entropy(self, num_classes: int) -> TrtDeviceArray:
        return self.maps.entropy(self.votes, num_classes)


class TrtSamples:
    """Backend.sample's accumulator for K > 1 on the GPU: the sample engines on the backend's
    stream (`runner`, whose two sum buffers serve every volume), the result in kept buffers."""

    def __init__(self, runner: EngineRunner, kept: KeptBuffers, maps: SampleMaps, samples: int,
                 grid: Sequence[int], num_classes: int):  # fmt: skip
        self.runner, self.kept, self.maps, self.samples = runner, kept, maps, samples
        self.grid, self.volume = tuple(int(s) for s in grid), (num_classes, *grid)
        self.votes = kept.array((samples, *self.grid), np.uint8)
        self.turn: int | None = None  # which sum buffer holds the running sum

    def fetch(self, plan: Any) -> tuple[None, Any]:
        """The decoder's probabilities slot (chunk, C, *grid), where the decoder wrote them."""
        return None, plan.b.probs

    def add(self, start: int, labels: None, probabilities: Any) -> None:
        r, count = self.runner, int(probabilities.shape[0])
        one, voxels = probabilities.nbytes // count, int(np.prod(self.grid))
        with r.device():
            for j in range(count):
                if self.turn is None:
                    r.zero("sum0", self.volume, np.float32)
                    self.turn = 0
                inputs = {
                    "total": f"sum{self.turn}",
                    "probabilities": r.at("sample", probabilities.buffer.ptr + j * one, self.volume, np.float32),
                }
                outputs = {
                    "total_out": f"sum{1 - self.turn}",
                    "labels": r.at("vote", self.votes.ptr + (start + j) * voxels, self.grid, np.uint8),
                }
                r.run("sample_accumulate", inputs, outputs)
                self.turn = 1 - self.turn

    def result(self, stage_ms: dict[str, float], chunk: int) -> TrtSampleResult:
        assert self.turn is not None
        r, mean = self.runner, self.kept.array(self.volume, np.float32)
        with r.device():
            r.upload("count", np.array(self.samples, np.float32))
            r.run("sample_mean", {"total": f"sum{self.turn}", "count": "count"},
                  {"mean": r.at("mean", mean.ptr, self.volume, np.float32)})  # fmt: skip
            r.stream.synchronize()  # complete before the volume engines' stream reads them
        result = TrtSampleResult(mean=mean, votes=self.votes, stage_ms=stage_ms, chunk=chunk)
        result.maps = self.maps
        return result
