"""The torch backend's K samples kept on its device (ldseg/runtime/samples.py): the sum, the votes,
the mean and the uncertainty maps as tensors where the model ran, for TorchVolumeOps to resample
without a round trip through the host (on an H200 the knee's float32 probabilities are 50 MB per
sample each way). Bit for bit the host's arithmetic: float32 additions sample by sample in the same
order, the mean's division (see `result`), the confidence the class maximum (the value at the
argmax), the entropy's terms looked up in `entropy_terms` (numpy's own -p log p) and summed class by
class in float32, then divided by log(C) in float64 as numpy does.

Streams: the mean and votes are made on the model's stream, the maps on TorchVolumeOps' own stream
(`stream`: the writer thread makes them, and must not queue behind the next volume's model run);
every tensor carries an event recorded after it was written, and whoever reads it waits for that
event first (TorchVolumeOps on its stream, a download on the host), so the writer thread may
resample volume i while the model computes volume i + 1.
Only used where TorchVolumeOps runs (Backend.sample(resident=True)); on the CPU the same code runs
with no events, which is how the tests hold it to the host path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Self

import numpy as np
import torch

from ldseg.runtime.samples import DeviceArray, SampleResult, entropy_terms


class TorchDeviceArray(DeviceArray):
    def __init__(self, tensor: torch.Tensor, ready: torch.cuda.Event | None = None):
        self.tensor = tensor
        self.ready = ready  # recorded after the tensor was written (CUDA); None on the CPU
        self.shape = tuple(tensor.shape)
        self.where = str(tensor.device)

    def wait(self) -> torch.Tensor:
        """The tensor, once the current stream has waited for its writer."""
        if self.ready is not None:
            torch.cuda.current_stream(self.tensor.device).wait_event(self.ready)
        return self.tensor

    def _download(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensor.cpu().numpy()

    def _item(self, index: int) -> Self:
        return type(self)(self.tensor[index], self.ready)


def _stamped(tensor: torch.Tensor) -> TorchDeviceArray:
    """`tensor` with an event on the current stream when it lives on a GPU."""
    if tensor.device.type != "cuda":
        return TorchDeviceArray(tensor)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(tensor.device))
    return TorchDeviceArray(tensor, event)


class TorchSampleResult(SampleResult):
    """A SampleResult whose mean and votes are TorchDeviceArrays; its maps are made on the device,
    on `stream` where one is given."""

    mean: TorchDeviceArray
    votes: TorchDeviceArray
    stream: torch.cuda.Stream | None = None

    @contextmanager
    def _maps(self) -> Iterator[None]:
        with torch.no_grad(), nullcontext() if self.stream is None else torch.cuda.stream(self.stream):
            yield

    def confidence(self) -> TorchDeviceArray:
        with self._maps():
            return _stamped(torch.amax(self.mean.wait(), dim=0))

    def entropy(self, num_classes: int) -> TorchDeviceArray:
        with self._maps():
            return _stamped(self._entropy(num_classes))

    def _entropy(self, num_classes: int) -> torch.Tensor:
        votes = self.votes.wait()
        table = torch.from_numpy(entropy_terms(votes.shape[0])).to(votes.device)
        total: torch.Tensor | None = None
        for c in range(num_classes):  # class by class: numpy's sum over the class axis, in its order
            terms = table[(votes == c).sum(dim=0)]
            total = terms if total is None else total.add_(terms)
        assert total is not None
        return (total.double() / float(np.log(num_classes))).float()


class TorchSamples:
    """Backend.sample's accumulator on the device (ldseg/runtime/samples.py's DeviceSamples)."""

    def __init__(
        self, samples: int, grid: Sequence[int], device: torch.device, stream: torch.cuda.Stream | None = None
    ):
        self.samples = samples
        self.stream = stream  # where the maps are made (TorchVolumeOps' stream)
        self.votes = torch.empty((samples, *grid), dtype=torch.uint8, device=device)
        self.total: torch.Tensor | None = None

    def fetch(self, plan: Any) -> tuple[torch.Tensor, torch.Tensor]:
        assert plan.labels is not None and plan.probabilities is not None
        return plan.labels, plan.probabilities

    @torch.no_grad()
    def add(self, start: int, labels: torch.Tensor, probabilities: torch.Tensor) -> None:
        self.votes[start : start + len(labels)].copy_(labels)
        for p in probabilities:  # a graph's outputs are its static buffers: the first is copied
            self.total = p.clone() if self.total is None else self.total.add_(p)

    @torch.no_grad()
    def result(self, stage_ms: dict[str, float], chunk: int) -> TorchSampleResult:
        assert self.total is not None
        # numpy divides the float32 sum by the intp count in float64 and rounds once to float32: the
        # same bits as a float32 division (float64 has more than 2 x 24 + 2 bits, so the double
        # rounding of a quotient is innocuous), which is what this is.
        mean = self.total.div_(self.samples)
        kept = _stamped(mean)
        votes = TorchDeviceArray(self.votes, kept.ready)  # one event: both were written before it
        result = TorchSampleResult(mean=kept, votes=votes, stage_ms=stage_ms, chunk=chunk)
        result.stream = self.stream
        return result
