"""The torch backend's volume operations on its device (ldseg/runtime/volume_ops.py): the volume
goes up in the dtype it is given through pinned memory (the readers give float32: converting an
int16 knee volume on the host costs under a millisecond, so they are left as they are), min-max runs
in float32 as the official code does, and both resamplings are
`F.interpolate(mode="trilinear", align_corners=True)` in float64: align_corners samples input
coordinate i * (in - 1) / (out - 1), which is exactly scipy.ndimage.zoom(order=1, grid_mode=False)
(ldseg.io.preprocess.zoom_to), and float64 is scipy's own arithmetic, so the float32 results equal the
CPU path's up to the order of the 8 corner terms (tests/runtime/backends/test_torch_volume.py).
Labels are the argmax of the resampled class maps (first class on ties, as np.argmax).

Everything runs on a stream of its own: the run path calls these from its reading and writing
threads while the model replays on the main one. Only uint8 labels and the float maps asked for
come back. NOT yet run on a GPU (no GPU since it was written); on the CPU the tests run it as is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from ldseg.runtime.backends.torch.samples import TorchDeviceArray
from ldseg.runtime.samples import ModelGridArray, host
from ldseg.runtime.volume_ops import DeviceMemoryError

_TO_MODEL = (2, 1, 0)  # nibabel (X, Y, Z) <-> model (D, H, W), as ldseg.io.preprocess
_CONSTANT = "cannot min-max standardize a constant (or NaN) image"  # the reference's words
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class TorchVolumeOps:
    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.where = str(self.device)
        self._cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self._cuda else None

    @contextmanager
    def _on_stream(self) -> Iterator[None]:
        """The operation on this object's stream; the device running out of memory leaves it as
        DeviceMemoryError (the run path then takes the CPU path for that step)."""
        try:
            if self.stream is None:
                yield
            else:
                with torch.cuda.stream(self.stream):
                    yield
                self.stream.synchronize()  # the host reads the result right after
        except _OUT_OF_MEMORY as exc:
            if self._cuda:
                torch.cuda.empty_cache()  # give back what the failed step held
            raise DeviceMemoryError.of(self.where, exc) from exc

    def _upload(self, array: ModelGridArray) -> torch.Tensor:
        """The array on this device: a result the backend left here as it is (once written), anything
        else through pinned memory."""
        if isinstance(array, TorchDeviceArray) and array.tensor.device == self.device:
            return array.wait()
        source = torch.from_numpy(np.ascontiguousarray(host(array)))
        if not self._cuda:
            return source
        return source.pin_memory().to(self.device, non_blocking=True)

    def _download(self, tensor: torch.Tensor) -> np.ndarray:
        if not self._cuda:
            return tensor.numpy()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        assert self.stream is not None
        self.stream.synchronize()
        return host.numpy()

    @torch.no_grad()
    def to_model_grid(self, array_nib: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        target = tuple(int(s) for s in grid)
        if array_nib.ndim != 3 or len(target) != 3:
            raise ValueError(f"to_model_grid: need a 3D array and 3D grid, got {array_nib.shape} and {target}")
        with self._on_stream():
            x = self._upload(array_nib).permute(*_TO_MODEL).to(torch.float32)
            shifted = x - x.min()
            peak = shifted.max()
            if not bool(peak > 0):  # also NaN (min and max propagate it)
                raise ValueError(_CONSTANT)
            standardized = (shifted / peak).to(torch.float64)
            zoomed = F.interpolate(standardized[None, None], size=target, mode="trilinear", align_corners=True)
            out = zoomed[0, 0].to(torch.float32)
            return self._download(out)

    @torch.no_grad()
    def labels_on_input_grid(self, probabilities: ModelGridArray, input_shape_nib: Sequence[int]) -> np.ndarray:
        if len(probabilities.shape) != 4 or len(input_shape_nib) != 3:
            raise ValueError(
                f"need probs (C, D, H, W) and a 3D input shape, got {probabilities.shape}, {tuple(input_shape_nib)}"
            )
        with self._on_stream():
            probs = self._upload(probabilities)
            # Class by class, keeping the running maximum: memory stays two maps on the input grid
            # whatever the class count; ">" keeps the lower class on a tie, as np.argmax.
            best = self._resampled(probs[None, :1], input_shape_nib)[0, 0]
            labels = torch.zeros(best.shape, dtype=torch.uint8, device=best.device)
            for c in range(1, probs.shape[0]):
                value = self._resampled(probs[None, c : c + 1], input_shape_nib)[0, 0]
                labels.masked_fill_(value > best, c)  # no host sync (a boolean index would make one)
                torch.maximum(best, value, out=best)
            return self._download(labels.permute(*_TO_MODEL).contiguous())

    @torch.no_grad()
    def map_on_input_grid(self, values: ModelGridArray, input_shape_nib: Sequence[int]) -> np.ndarray:
        with self._on_stream():
            mapped = self._resampled(self._upload(values).to(torch.float32)[None, None], input_shape_nib)
            return self._download(mapped[0, 0].permute(*_TO_MODEL).contiguous())

    def _resampled(self, volumes: torch.Tensor, input_shape_nib: Sequence[int]) -> torch.Tensor:
        """(1, C, D, H, W) float32 -> (1, C, *input (D, H, W)) float32, interpolated in float64
        (scipy's arithmetic) and rounded once, as scipy rounds into a float32 output."""
        target = tuple(int(s) for s in input_shape_nib)[::-1]
        up = F.interpolate(volumes.to(torch.float64), size=target, mode="trilinear", align_corners=True)
        return up.to(torch.float32)
