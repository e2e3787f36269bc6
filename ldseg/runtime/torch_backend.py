"""PyTorch reference backend (FP32, CPU or CUDA).

On CUDA the whole pipeline — encoder, N fused steps, decoder with argmax — is captured once per
(batch, steps) into a torch.cuda.CUDAGraph over static buffers; a request copies its inputs into
those buffers, replays, and reads the labels: no Python work, allocation or host sync inside.
Where capture fails the backend warns once with the reason and runs the same code eagerly.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ldseg.model.network import LDSeg
from ldseg.runtime.backend import PipelineInputs, PipelineOutputs


@dataclass
class _Buffers:
    image: torch.Tensor
    z_init: torch.Tensor
    noise: torch.Tensor
    table: torch.Tensor
    probabilities: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class TorchBackend:
    name = "torch"

    def __init__(self, model: LDSeg, device: str = "cpu", cuda_graph: bool | None = None):
        self.model = model.to(device).eval()
        self.device = device
        self.precision = "fp32"
        self.cuda_graph = device.startswith("cuda") if cuda_graph is None else cuda_graph
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, _Buffers]] = {}
        self.fallback_reason: str | None = None

    def describe(self) -> dict[str, str]:
        mode = "cuda-graph" if self.cuda_graph and self.fallback_reason is None else "eager"
        return {"backend": self.name, "device": self.device, "precision": self.precision, "mode": mode}

    def _pipeline(self, buf: _Buffers, marks: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder -> N fused steps -> decoder; every shape fixed by the buffers. `marks` (eager
        only) collects a timestamp after each stage."""

        def mark() -> None:
            if marks is not None:
                if buf.image.is_cuda:
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())

        batch = buf.image.shape[0]
        mark()
        z_image = self.model.encode_image(buf.image)
        mark()
        z = buf.z_init
        for i in range(buf.table.shape[0]):
            z = self.model.step(z, z_image, buf.table[i].expand(batch, 4), buf.noise[i])
        mark()
        probs = self.model.label_decoder(z)
        labels = probs.argmax(dim=1).to(torch.uint8)
        mark()
        return probs, labels

    def _buffers(self, inputs: PipelineInputs) -> _Buffers:
        dev = torch.device(self.device)
        return _Buffers(
            image=torch.from_numpy(inputs.image).to(dev),
            z_init=torch.from_numpy(inputs.z_init).to(dev),
            noise=torch.from_numpy(inputs.noise).to(dev),
            table=torch.from_numpy(inputs.table).to(dev),
        )

    def _captured(self, inputs: PipelineInputs) -> tuple[torch.cuda.CUDAGraph, _Buffers] | None:
        key = (inputs.batch, inputs.steps)
        if key in self._graphs:
            return self._graphs[key]
        if self.fallback_reason is not None:
            return None
        buf = self._buffers(inputs)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside capture: lazy inits, cuDNN autotune
                for _ in range(2):
                    self._pipeline(buf)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                buf.probabilities, buf.labels = self._pipeline(buf)
        except RuntimeError as exc:
            self.fallback_reason = f"CUDA-graph capture failed ({exc}); running per-step launches"
            warnings.warn(self.fallback_reason, RuntimeWarning, stacklevel=3)
            return None
        self._graphs[key] = (graph, buf)
        return graph, buf

    @torch.no_grad()
    def run(self, inputs: PipelineInputs, *, probabilities: bool = False) -> PipelineOutputs:
        if self.cuda_graph:
            captured = self._captured(inputs)
            if captured is not None:
                return self._replay(*captured, inputs, probabilities)
        return self._eager(inputs, probabilities)

    def _replay(
        self, graph: torch.cuda.CUDAGraph, buf: _Buffers, inputs: PipelineInputs, probabilities: bool
    ) -> PipelineOutputs:
        assert buf.labels is not None and buf.probabilities is not None
        start, copied, replayed = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        for target, source in ((buf.image, inputs.image), (buf.z_init, inputs.z_init),
                               (buf.noise, inputs.noise), (buf.table, inputs.table)):
            target.copy_(torch.from_numpy(source), non_blocking=False)
        copied.record()
        graph.replay()
        replayed.record()
        labels = buf.labels.cpu().numpy()
        out_probs = buf.probabilities.cpu().numpy() if probabilities else None
        torch.cuda.synchronize()
        stage_ms = {"input_copy": start.elapsed_time(copied), "graph": copied.elapsed_time(replayed)}
        return PipelineOutputs(labels=labels, probabilities=out_probs, stage_ms=stage_ms)

    def _eager(self, inputs: PipelineInputs, probabilities: bool) -> PipelineOutputs:
        marks: list[float] = []
        probs, labels = self._pipeline(self._buffers(inputs), marks)
        out_probs: np.ndarray | None = probs.cpu().numpy() if probabilities else None
        names = ("encoder", "loop", "decoder")
        stage_ms = {name: (b - a) * 1e3 for name, a, b in zip(names, marks, marks[1:])}
        return PipelineOutputs(labels=labels.cpu().numpy(), probabilities=out_probs, stage_ms=stage_ms)
