"""PyTorch reference backend (FP32 on CPU or CUDA); on CUDA the pipeline can be graph-captured."""

from __future__ import annotations

import time

import numpy as np
import torch

from ldseg.model.network import LDSeg
from ldseg.runtime.backend import PipelineInputs, PipelineOutputs


class TorchBackend:
    name = "torch"

    def __init__(self, model: LDSeg, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.device = device
        self.precision = "fp32"

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": self.device, "precision": self.precision}

    @torch.no_grad()
    def run(self, inputs: PipelineInputs, *, probabilities: bool = False) -> PipelineOutputs:
        dev = torch.device(self.device)
        times: dict[str, float] = {}
        clock = time.perf_counter()
        image = torch.from_numpy(inputs.image).to(dev)
        z_image = self.model.encode_image(image)
        times["encoder"] = (time.perf_counter() - clock) * 1e3
        z = torch.from_numpy(inputs.z_init).to(dev)
        noise = torch.from_numpy(inputs.noise).to(dev)
        table = torch.from_numpy(inputs.table).to(dev)
        clock = time.perf_counter()
        for i in range(inputs.steps):
            z = self.model.step(z, z_image, table[i].expand(inputs.batch, 4), noise[i])
        times["loop"] = (time.perf_counter() - clock) * 1e3
        clock = time.perf_counter()
        probs = self.model.label_decoder(z)
        labels = probs.argmax(dim=1).to(torch.uint8).cpu().numpy()
        times["decoder"] = (time.perf_counter() - clock) * 1e3
        out_probs: np.ndarray | None = probs.cpu().numpy() if probabilities else None
        return PipelineOutputs(labels=labels, probabilities=out_probs, stage_ms=times)
