"""K samples of one image, summed sample by sample (`Backend.sample`), and the maps made from them.

`SampleResult` holds the mean probabilities and the K label votes on the model grid, and makes the
two uncertainty maps a run writes for K > 1: confidence (the mean probability of the chosen class)
and vote entropy. The host version here is the reference: numpy arrays, the arithmetic the run path
always had.

Where a backend pre- and post-processes on its own device (issue 30), it may keep the result there
instead (`Backend.sample(..., resident=True)`): its mean and votes are then `DeviceArray`s that its
own volume ops take without a copy, and its confidence and entropy run on the device too, bit for bit
the host's arithmetic (same additions in the same order, the entropy's terms from `entropy_terms`).
Only what is written comes back to the host: the labels and the float maps asked for. A
`DeviceArray` still works wherever a numpy array is expected (`np.asarray` downloads it once), so
QC, the CPU fallback and the 2D path need nothing of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

import numpy as np


class DeviceArray:
    """An array left on a backend's device; `np.asarray` brings it to the host (once, then cached).
    Subclasses (one per backend that keeps results) implement `_download` and `_item`."""

    shape: tuple[int, ...]
    where: str  # the device, for messages ("cuda:0")
    _host: np.ndarray | None = None

    def _download(self) -> np.ndarray:
        raise NotImplementedError

    def _item(self, index: int) -> Self:
        raise NotImplementedError

    def numpy(self) -> np.ndarray:
        if self._host is None:
            self._host = self._download()
        return self._host

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        cached = self.numpy()
        converted = cached if dtype is None else cached.astype(dtype, copy=False)
        return converted.copy() if copy and converted is cached else converted  # the cache stays ours

    def __getitem__(self, index: int) -> Self:
        """One entry of the first axis (a class of the mean), still on the device."""
        return self._item(index)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)


ModelGridArray = np.ndarray | DeviceArray  # a model-grid array, on the host or left on the device


def host(array: ModelGridArray) -> np.ndarray:
    """The array on the host (a download for a DeviceArray, the array itself otherwise)."""
    return array.numpy() if isinstance(array, DeviceArray) else array


def entropy_terms(samples: int) -> np.ndarray:
    """-p log p for p = n / samples, n = 0..samples, as float32 in vote_entropy's own arithmetic (0 for
    n = 0): the table a device looks vote counts up in, so its entropy equals the host's bit for bit."""
    counts = np.arange(samples + 1, dtype=np.float32)
    return _terms(counts / samples)


def _terms(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, -p * np.log(p), 0.0)


def vote_entropy(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-voxel entropy of K label votes (K, *grid), normalized to [0, 1] by log(num_classes)."""
    counts = np.stack([(labels == c).sum(axis=0) for c in range(num_classes)]).astype(np.float32)
    terms = _terms(counts / labels.shape[0])
    return (terms.sum(axis=0) / np.log(num_classes)).astype(np.float32)


@dataclass
class SampleResult:
    """K samples of one image, accumulated chunk by chunk (`Backend.sample`)."""

    mean: ModelGridArray  # (num_classes, *grid) float32: the mean probabilities over the K samples
    votes: ModelGridArray  # (K, *grid) uint8: each sample's labels (vote entropy, QC)
    stage_ms: dict[str, float]
    chunk: int  # samples per decoder run

    @property
    def samples(self) -> int:
        return len(self.votes)

    def confidence(self) -> ModelGridArray:
        """The mean probability of each voxel's chosen class (the argmax's; first class on ties)."""
        mean = host(self.mean)
        return np.take_along_axis(mean, mean.argmax(axis=0)[None], axis=0)[0]

    def entropy(self, num_classes: int) -> ModelGridArray:
        """The K votes' entropy per voxel, in [0, 1]."""
        return vote_entropy(host(self.votes), num_classes)


class HostSamples:
    """The host accumulator of `Backend.sample`: labels into the votes, probabilities summed sample
    by sample in float32, the additions `probabilities.sum(axis=0)` makes, so chunking changes no bit."""

    def __init__(self, samples: int, grid: Sequence[int]):
        self.samples = samples
        self.votes = np.empty((samples, *grid), np.uint8)
        self.total: np.ndarray | None = None

    def add(self, start: int, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        assert probabilities is not None
        self.votes[start : start + len(labels)] = labels
        for p in probabilities:
            if self.total is None:
                self.total = np.array(p, dtype=np.float32, copy=True)
            else:
                np.add(self.total, p, out=self.total)

    def result(self, stage_ms: dict[str, float], chunk: int) -> SampleResult:
        assert self.total is not None
        # np.mean's own division (by an intp count, into the float32 sum): the same bits as before.
        mean = np.true_divide(self.total, np.intp(self.samples), out=self.total, casting="unsafe")
        return SampleResult(mean=mean, votes=self.votes, stage_ms=stage_ms, chunk=chunk)


class DeviceSamples(Protocol):
    """What a backend hands `Backend.sample` to keep K samples on its device (`device_samples`)."""

    def fetch(self, plan: Any) -> tuple[Any, Any]:
        """The decoded chunk's (labels, probabilities) as the device holds them."""
        ...

    def add(self, start: int, labels: Any, probabilities: Any) -> None: ...

    def result(self, stage_ms: dict[str, float], chunk: int) -> SampleResult: ...
