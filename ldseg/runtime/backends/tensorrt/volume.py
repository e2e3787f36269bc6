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
sample the backend kept on this GPU (samples.py) is read class by class at its own address, and
its confidence and vote-entropy maps are made here by the sample engines, on this stream.

Memory: engine_runner.py's slots and one activation buffer, kept and grown, so a folder of
same-shaped volumes allocates once; the kept results' buffers (`kept`) are pooled likewise. A
volume outside the engines' input-grid range raises DeviceStepUnavailable and a cudaMalloc that
fails DeviceMemoryError: the run path then resamples that volume on the CPU.

NOT RUN on TensorRT or a GPU: executed on the emulated CUDA/TensorRT layer (tests/tensorrt/emulator.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ldseg.runtime.artifacts.engines import EngineSet
from ldseg.runtime.backends.tensorrt.engine_runner import EngineRunner
from ldseg.runtime.backends.tensorrt.samples import KeptBuffers, TrtDeviceArray
from ldseg.runtime.samples import ModelGridArray, entropy_terms, host
from ldseg.runtime.volume_ops import FLOAT32, DeviceStepUnavailable, axis_feeds

if TYPE_CHECKING:
    import tensorrt as trt

_TO_MODEL = (2, 1, 0)
_CONSTANT = "cannot min-max standardize a constant (or NaN) image"  # ldseg.io.preprocess's words
_FEEDS = {"index_dtype": FLOAT32.index_dtype, "weight_dtype": FLOAT32.weight_dtype}


class TrtVolumeOps(EngineRunner):
    """The volume engines of an engine set on GPU `index` (and its sample engines' maps), on a
    stream of their own; engines and contexts made on first use."""

    def __init__(self, engine_set: EngineSet, load: Callable[[str], trt.ICudaEngine], index: int):
        super().__init__(engine_set, load, index)
        self.grid = tuple(int(s) for s in engine_set.config.image_size)
        self.max_input_grid = engine_set.max_input_grid
        self.kept = KeptBuffers(index)  # the buffers of the results kept for these engines

    def describe(self) -> str:
        return f"TensorRT engines on {self.where} (float32; input grid <= {self.max_input_grid} per axis)"

    # ------------------------------------------------------------------ the three operations

    def to_model_grid(self, array_nib: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        target = tuple(int(s) for s in grid)
        if array_nib.ndim != 3 or target != self.grid:
            raise ValueError(f"to_model_grid: need a 3D array and the engines' grid {self.grid}, got "
                             f"{array_nib.shape} and {target}")  # fmt: skip
        self._check_range(array_nib.shape)
        with self.device():
            self.upload("volume", array_nib, np.float32)
            feeds = axis_feeds(array_nib.shape[::-1], target, **_FEEDS)
            for name, array in feeds.items():
                self.upload(f"pre:{name}", array)
            self.run("volume_to_model_grid", {"volume": "volume", **{n: f"pre:{n}" for n in feeds}},
                      {"image": "image", "peak": "peak", "total": "total"})  # fmt: skip
            image, peak, total = (self.download(k) for k in ("image", "peak", "total"))
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
        with self.device():
            feeds = self._upload_feeds(probabilities.shape[1:], target)
            # Ping-pong (best, index) pairs on the device; the first class beats -inf everywhere.
            self.fill("best0", target, np.float32, -np.inf)
            self.fill("index0", target, np.int32, 0)
            for c in range(probabilities.shape[0]):
                now, after = c % 2, 1 - c % 2
                values = self._put_values(probabilities[c])
                self.upload("klass", np.array(c, np.int32))
                inputs = {"values": values, **feeds, "best": f"best{now}", "index": f"index{now}", "klass": "klass"}
                outputs = {"best_out": f"best{after}", "index_out": f"index{after}", "labels": "labels"}
                self.run("volume_class_step", inputs, outputs)
            labels = self.download("labels")
        return np.ascontiguousarray(labels.transpose(_TO_MODEL))

    def map_on_input_grid(self, values: ModelGridArray, input_shape_nib: Sequence[int]) -> np.ndarray:
        values = self._here(values)
        if values.shape != self.grid or len(input_shape_nib) != 3:
            raise ValueError(
                f"need a map of {self.grid} and a 3D input shape, got {values.shape}, {tuple(input_shape_nib)}"
            )
        self._check_range(input_shape_nib)
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        with self.device():
            feeds = self._upload_feeds(values.shape, target)
            self.run("volume_map", {"values": self._put_values(values), **feeds}, {"result": "result"})
            return self.download("result")

    # ------------------------------------------------------------------ plumbing

    def _check_range(self, shape: Sequence[int]) -> None:
        if not all(1 <= int(s) <= self.max_input_grid for s in shape):
            raise DeviceStepUnavailable(
                f"{self.where}: a {tuple(int(s) for s in shape)} volume is outside the TensorRT volume engines' "
                f"range (1..{self.max_input_grid} voxels per axis; rebuild with --max-input-grid)"
            )

    def _here(self, array: ModelGridArray) -> np.ndarray | TrtDeviceArray:
        """A sample the backend kept on this GPU as it is, anything else on the host."""
        if isinstance(array, TrtDeviceArray) and array.gpu == self._index:
            return array
        return host(array)

    def _put_values(self, values: np.ndarray | TrtDeviceArray) -> str:
        """The slot key a graph's `values` input reads: a kept array in place, a host one uploaded."""
        if isinstance(values, TrtDeviceArray):
            return self.at("kept", values.ptr, values.shape, values.dtype)
        self.upload("values", values, np.float32)
        return "values"

    def _upload_feeds(self, sizes_in: Sequence[int], sizes_out: Sequence[int]) -> dict[str, str]:
        feeds = axis_feeds(sizes_in, sizes_out, **_FEEDS)
        for name, array in feeds.items():
            self.upload(f"post:{name}", array)
        return {name: f"post:{name}" for name in feeds}

    # ------------------------------------------------------------------ a kept result's maps (samples.py)

    def class_max(self, mean: TrtDeviceArray) -> TrtDeviceArray:
        """The confidence map: the kept mean's maximum over the classes, into a kept buffer."""
        out = self.kept.array(mean.shape[1:], np.float32)
        with self.device():
            inputs = {"mean": self.at("mean", mean.ptr, mean.shape, mean.dtype)}
            self.run("sample_class_max", inputs, {"confidence": self.at("out", out.ptr, out.shape, out.dtype)})
            self.stream.synchronize()
        return out

    def entropy(self, votes: TrtDeviceArray, num_classes: int) -> TrtDeviceArray:
        """The vote-entropy map of the kept votes, into a kept buffer (vote_entropy's terms; the
        division by log(C) in float32)."""
        out = self.kept.array(votes.shape[1:], np.float32)
        with self.device():
            self.upload("terms", entropy_terms(votes.shape[0]))
            self.upload("log_classes", np.array(np.log(num_classes), np.float32))
            inputs = {"votes": self.at("votes", votes.ptr, votes.shape, votes.dtype), "terms": "terms",
                      "log_classes": "log_classes"}  # fmt: skip
            self.run("sample_entropy", inputs, {"entropy": self.at("out", out.ptr, out.shape, out.dtype)})
            self.stream.synchronize()
        return out

    def release(self) -> None:
        super().release()
        self.kept.release()
