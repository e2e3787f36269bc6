"""The ONNX Runtime backend's K samples kept on its device (ldseg/runtime/samples.py): the running
sum, the votes, the mean and the uncertainty maps as OrtValues where the decoder wrote its
probabilities, made by the small graphs of ldseg/runtime/sample_graphs.py (bit for bit the host's
arithmetic), and read by OrtVolumeOps in place: a class of the mean, or a sample's probabilities
in the decoder's output, is bound by pointer (`bind_input(..., data_ptr + offset)`), as the step
graph binds its table rows. Only the labels and the maps asked for come back to the host.

ONNX Runtime synchronizes a run with I/O binding before it returns, so a value is complete when the
call that wrote it returns: no events. Each result owns its OrtValues (the decoder's output buffer
is the backend's and is overwritten by the next run), so the writer thread may resample volume i
while the model computes volume i + 1. Used where the backend's volume ops run
(`device_volume=True`, the default on CUDA); on the CPU provider the same code runs on host memory,
which is how the tests hold it to the host path.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from ldseg.runtime.artifacts.graph_cache import cached_graph
from ldseg.runtime.backends.onnxruntime.probe import onnxruntime_needed
from ldseg.runtime.samples import DeviceArray, SampleResult, entropy_terms

with onnxruntime_needed("the onnxruntime backend"):
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

if TYPE_CHECKING:
    import onnx

_DAMAGED = (ort_state.InvalidProtobuf, ort_state.InvalidGraph, ort_state.Fail)
Device = tuple[str, int]  # ("cuda", 0) or ("cpu", 0): where OrtValues live


def small_session(
    builder: str, *args: int, providers: list[tuple[str, dict[str, str]]], cache: Path | None = None
) -> ort.InferenceSession:
    """A quiet session for one of the small weightless graphs (volume and sample graphs): `builder`
    names its function in ldseg.runtime ("volume_graphs.map_graph"), called with `args`. The graph
    comes serialized from the artifact cache (graph_cache.py); only on a miss are the builders, and
    onnx with them (0.6 s on a 2-core CPU), imported, so a cold run on a GPU starts from bytes and a
    run that never makes a graph (the CPU provider keeps scipy and host samples) imports neither.
    cache: the artifact cache root (None: the user's)."""
    module, function = builder.split(".")
    name = "-".join([function.removesuffix("_graph"), *map(str, args)])

    def build() -> bytes:
        model: onnx.ModelProto = getattr(importlib.import_module(f"ldseg.runtime.{module}"), function)(*args)
        return model.SerializeToString()

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(cached_graph(name, build, cache), options, providers=providers)
    except _DAMAGED:  # an entry damaged on disk (one built now that fails fails again: raised)
        return ort.InferenceSession(cached_graph(name, build, cache, fresh=True), options, providers=providers)


class OrtDeviceArray(DeviceArray):
    """A (shape, dtype) array at byte `offset` inside `value` (an OrtValue it keeps alive)."""

    def __init__(self, value: ort.OrtValue, shape: Sequence[int], dtype: Any, device: Device, offset: int = 0):
        self.value, self.dtype, self.device, self.offset = value, np.dtype(dtype), device, offset
        self.shape = tuple(int(s) for s in shape)
        self.where = device[0] if device[0] == "cpu" else f"{device[0]}:{device[1]}"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def bind_input(self, binding: ort.IOBinding, name: str) -> None:
        kind, index = self.device
        binding.bind_input(name, kind, index, self.dtype.type, list(self.shape), self.value.data_ptr() + self.offset)

    def _download(self) -> np.ndarray:
        flat = np.asarray(self.value.numpy()).reshape(-1).view(np.uint8)
        return np.array(flat[self.offset : self.offset + self.nbytes].view(self.dtype).reshape(self.shape), copy=True)

    def _item(self, index: int) -> Self:
        plane = self.nbytes // self.shape[0]
        return type(self)(self.value, self.shape[1:], self.dtype, self.device, self.offset + index * plane)


class OrtSampleGraphs:
    """Sessions of the sample graphs on the backend's providers, made on first use."""

    def __init__(self, providers: list[tuple[str, dict[str, str]]], device: Device, cache: Path | None = None):
        self.providers, self.device, self.cache = providers, device, cache
        self._accumulate: dict[int, ort.InferenceSession] = {}
        self._entropy: dict[int, ort.InferenceSession] = {}

    def _session(self, builder: str, *args: int) -> ort.InferenceSession:
        return small_session(f"sample_graphs.{builder}", *args, providers=self.providers, cache=self.cache)

    def accumulate(self, num_classes: int) -> ort.InferenceSession:
        if num_classes not in self._accumulate:
            self._accumulate[num_classes] = self._session("accumulate_graph", num_classes)
        return self._accumulate[num_classes]

    @cached_property
    def mean(self) -> ort.InferenceSession:
        return self._session("mean_graph")

    @cached_property
    def class_max(self) -> ort.InferenceSession:
        return self._session("class_max_graph")

    def entropy(self, num_classes: int) -> ort.InferenceSession:
        if num_classes not in self._entropy:
            self._entropy[num_classes] = self._session("entropy_graph", num_classes)
        return self._entropy[num_classes]

    def empty(self, shape: Sequence[int], dtype: Any) -> ort.OrtValue:
        kind, index = self.device
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), kind, index)

    def run(self, session: ort.InferenceSession, inputs: dict[str, Any], output: str) -> OrtDeviceArray:
        """One run: OrtDeviceArray inputs bound in place, numpy ones copied in; the output allocated
        by ONNX Runtime on the device."""
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, OrtDeviceArray):
                value.bind_input(binding, name)
            else:
                binding.bind_cpu_input(name, value)
        kind, index = self.device
        binding.bind_output(output, kind, index)
        session.run_with_iobinding(binding)
        [value] = binding.get_outputs()
        return OrtDeviceArray(value, value.shape(), np.float32, self.device)


class OrtSampleResult(SampleResult):
    """A SampleResult whose mean and votes are OrtDeviceArrays; its maps are made by the graphs."""

    mean: OrtDeviceArray
    votes: OrtDeviceArray
    graphs: OrtSampleGraphs

    def confidence(self) -> OrtDeviceArray:
        return self.graphs.run(self.graphs.class_max, {"mean": self.mean}, "confidence")

    def entropy(self, num_classes: int) -> OrtDeviceArray:
        inputs = {
            "votes": self.votes,
            "terms": entropy_terms(self.votes.shape[0]),
            "log_classes": np.array(np.log(num_classes), np.float64),  # numpy's divisor, as vote_entropy's
        }
        return self.graphs.run(self.graphs.entropy(num_classes), inputs, "entropy")


class OrtSamples:
    """Backend.sample's accumulator on the device (ldseg/runtime/samples.py's DeviceSamples)."""

    def __init__(self, graphs: OrtSampleGraphs, samples: int, grid: Sequence[int], num_classes: int):
        self.graphs, self.samples = graphs, samples
        self.grid, self.volume = tuple(grid), (num_classes, *grid)
        self.votes = graphs.empty((samples, *grid), np.uint8)
        self.total: OrtDeviceArray | None = None
        self.spare: ort.OrtValue | None = None  # the other buffer of the sum's ping-pong

    def fetch(self, plan: Any) -> tuple[None, ort.OrtValue]:
        """The decoder's probabilities (chunk, C, *grid), in its own output buffer (labels: none; the
        votes are the accumulate graph's)."""
        return None, plan.pipe.probabilities_graph()[1].value

    def add(self, start: int, labels: None, probabilities: ort.OrtValue) -> None:
        device = self.graphs.device
        for j in range(probabilities.shape()[0]):
            sample = OrtDeviceArray(probabilities, self.volume, np.float32, device)
            sample.offset = j * sample.nbytes
            target = self.spare if self.spare is not None else self.graphs.empty(self.volume, np.float32)
            accumulate = self.graphs.accumulate(self.volume[0])
            binding = accumulate.io_binding()
            if self.total is None:
                binding.bind_cpu_input("total", np.zeros((1, 1, 1, 1), np.float32))
            else:
                self.total.bind_input(binding, "total")
            sample.bind_input(binding, "probabilities")
            binding.bind_ortvalue_output("total_out", target)
            kind, index = device
            vote = self.votes.data_ptr() + (start + j) * int(np.prod(self.grid))  # uint8: a byte per voxel
            binding.bind_output("labels", kind, index, np.uint8, list(self.grid), vote)
            accumulate.run_with_iobinding(binding)
            self.spare = None if self.total is None else self.total.value
            self.total = OrtDeviceArray(target, self.volume, np.float32, device)

    def result(self, stage_ms: dict[str, float], chunk: int) -> OrtSampleResult:
        assert self.total is not None
        mean = self.total
        if self.samples > 1:  # x / 1 is x
            mean = self.graphs.run(
                self.graphs.mean, {"total": self.total, "count": np.array(self.samples, np.float32)}, "mean"
            )
        votes = OrtDeviceArray(self.votes, (self.samples, *self.grid), np.uint8, self.graphs.device)
        result = OrtSampleResult(mean=mean, votes=votes, stage_ms=stage_ms, chunk=chunk)
        result.graphs = self.graphs
        return result
