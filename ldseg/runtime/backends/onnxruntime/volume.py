"""ONNX Runtime's volume operations (ldseg/runtime/volume_ops.py): pre- and post-processing as the
three small ONNX graphs of ldseg/runtime/volume_graphs.py in float64 (scipy's arithmetic), run by the
backend's own execution provider, so a runtime-only GPU install does them on the GPU without PyTorch.

The class step runs once per class; the running best value and index stay on the device between the
runs (I/O binding) and only the uint8 labels come back. Other inputs and outputs are host arrays
(session.run copies them to and from the device); the volume goes up as float32 (an int16 scan
converts exactly).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np

from ldseg.runtime.backends.onnxruntime.probe import CUDA_PROVIDER, onnxruntime_needed
from ldseg.runtime.backends.onnxruntime.samples import OrtDeviceArray, small_session
from ldseg.runtime.samples import ModelGridArray, host
from ldseg.runtime.volume_ops import DeviceMemoryError, axis_feeds

with onnxruntime_needed("the onnxruntime backend"):
    import onnxruntime as ort

_CONSTANT = "cannot min-max standardize a constant (or NaN) image"  # ldseg.io.preprocess's words
_TO_MODEL = (2, 1, 0)
# How ONNX Runtime words an allocation failure (BFC arena, CUDA allocator, CPU allocator).
_OUT_OF_MEMORY_WORDS = ("failed to allocate memory", "out of memory", "cudaerrormemoryallocation")


class OrtVolumeOps:
    """The three graphs in sessions on `providers` (the backend's), made on first use; `cache`: the
    artifact cache root their serialized graphs are kept in (None: the user's)."""

    def __init__(self, providers: list[tuple[str, dict[str, str]]], where: str, cache: Path | None = None):
        self.providers, self.where, self.cache = providers, where, cache
        name, options = providers[0]
        # (kind, index) where this provider's OrtValues live: the class step's running best and index
        # between its runs, and the samples the backend keeps for these ops (samples.py).
        self.device = ("cuda", int(options.get("device_id", 0))) if name == CUDA_PROVIDER else ("cpu", 0)

    def _session(self, builder: str) -> ort.InferenceSession:
        # In EXACT, the builders' default (a test holds it): ONNX Runtime resamples in float64.
        return small_session(f"volume_graphs.{builder}", providers=self.providers, cache=self.cache)

    @cached_property
    def _pre(self) -> ort.InferenceSession:
        return self._session("to_model_grid_graph")

    @cached_property
    def _class_step(self) -> ort.InferenceSession:
        return self._session("class_step_graph")

    @cached_property
    def _map(self) -> ort.InferenceSession:
        return self._session("map_graph")

    def to_model_grid(self, array_nib: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        target = tuple(int(s) for s in grid)
        if array_nib.ndim != 3 or len(target) != 3:
            raise ValueError(f"to_model_grid: need a 3D array and 3D grid, got {array_nib.shape} and {target}")
        volume = np.ascontiguousarray(array_nib, dtype=np.float32)
        feeds = {"volume": volume, **axis_feeds(volume.shape[::-1], target)}
        with self._device_memory():
            image, peak, total = self._pre.run(None, feeds)
        if not (float(peak) > 0 and np.isfinite(total)):
            raise ValueError(_CONSTANT)
        return np.asarray(image, dtype=np.float32)

    def labels_on_input_grid(self, probabilities: ModelGridArray, input_shape_nib: Sequence[int]) -> np.ndarray:
        probabilities = self._here(probabilities)
        if probabilities.ndim != 4 or len(input_shape_nib) != 3:
            raise ValueError(
                f"need probs (C, D, H, W) and a 3D input shape, got {probabilities.shape}, {tuple(input_shape_nib)}"
            )
        if probabilities.shape[0] > 256:
            raise ValueError(f"at most 256 classes fit uint8 labels, got {probabilities.shape[0]}")
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        with self._device_memory():
            labels = self._fold_classes(probabilities, target)
        return np.ascontiguousarray(labels.transpose(_TO_MODEL))

    def _here(self, array: ModelGridArray) -> np.ndarray | OrtDeviceArray:
        """A result the backend kept on this device as it is (bound in place), anything else on the host."""
        return array if isinstance(array, OrtDeviceArray) and array.device == self.device else host(array)

    def _fold_classes(self, probabilities: np.ndarray | OrtDeviceArray, target: tuple[int, ...]) -> np.ndarray:
        """The class step over every class, on the device; the index map (n0, n1, n2) on the host."""
        device, device_id = self.device
        # Ping-pong pairs of (best, index) on the device; the first class beats -inf everywhere.
        pairs = [
            (
                ort.OrtValue.ortvalue_from_numpy(np.full(target, -np.inf, np.float32), device, device_id),
                ort.OrtValue.ortvalue_from_numpy(np.zeros(target, np.uint8), device, device_id),
            ),
            (
                ort.OrtValue.ortvalue_from_shape_and_type(target, np.float32, device, device_id),
                ort.OrtValue.ortvalue_from_shape_and_type(target, np.uint8, device, device_id),
            ),
        ]
        binding = self._class_step.io_binding()
        for name, array in axis_feeds(probabilities.shape[1:], target).items():
            binding.bind_cpu_input(name, array)
        for c in range(probabilities.shape[0]):
            (best, index), (best_out, index_out) = pairs[c % 2], pairs[1 - c % 2]
            if isinstance(probabilities, OrtDeviceArray):
                probabilities[c].bind_input(binding, "values")
            else:
                binding.bind_cpu_input("values", np.ascontiguousarray(probabilities[c], dtype=np.float32))
            binding.bind_cpu_input("klass", np.array(c, np.uint8))
            binding.bind_ortvalue_input("best", best)
            binding.bind_ortvalue_input("index", index)
            binding.bind_ortvalue_output("best_out", best_out)
            binding.bind_ortvalue_output("index_out", index_out)
            self._class_step.run_with_iobinding(binding)
        # A copy: on the CPU provider numpy() is a view of the OrtValue, which dies with `pairs`.
        return np.array(pairs[probabilities.shape[0] % 2][1].numpy(), copy=True)

    def map_on_input_grid(self, values: ModelGridArray, input_shape_nib: Sequence[int]) -> np.ndarray:
        here = self._here(values)
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        feeds = axis_feeds(here.shape, target)
        with self._device_memory():
            if isinstance(here, np.ndarray):
                return np.asarray(self._map.run(None, {"values": np.ascontiguousarray(here, np.float32), **feeds})[0])
            binding = self._map.io_binding()  # the kept map bound in place; the result comes back
            here.bind_input(binding, "values")
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output("result", "cpu")
            self._map.run_with_iobinding(binding)
            return np.array(binding.get_outputs()[0].numpy(), copy=True)

    @contextmanager
    def _device_memory(self) -> Iterator[None]:
        """ONNX Runtime's allocation failures (its own words, on any provider) as DeviceMemoryError."""
        try:
            yield
        except Exception as exc:
            if not any(words in str(exc).lower() for words in _OUT_OF_MEMORY_WORDS):
                raise
            raise DeviceMemoryError.of(self.where, exc) from exc
