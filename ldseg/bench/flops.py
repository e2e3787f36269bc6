"""FLOPs per stage, counted (not estimated) with torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions (transposed included),
matmuls/linears, batched matmuls and scaled-dot-product attention; element-wise work (norms,
activations, bias adds, the sampler update, argmax) is not counted, so achieved GFLOP/s is a
lower bound on the arithmetic actually done. The graph is the same for every backend and precision,
so the model is built on the meta device: shapes only, no weights, no compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldseg.model.config import ModelConfig
from ldseg.model.network import LDSeg


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the torch ops that `fn` runs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class PipelineFlops:
    """FLOPs of one pipeline call at a batch size (whole batch)."""

    encoder: int
    step: int
    decoder: int

    def stages(self, steps: int) -> dict[str, int]:
        return {"input_copy": 0, "encoder": self.encoder, "step": self.step,
                "loop": steps * self.step, "decoder": self.decoder, "output_copy": 0}

    def end_to_end(self, steps: int) -> int:
        return self.encoder + steps * self.step + self.decoder


@cache
def pipeline_flops(cfg: ModelConfig, batch: int) -> PipelineFlops:
    with torch.device("meta"):
        model = LDSeg(cfg).eval()
        image = torch.empty(batch, *cfg.image_shape)
        z = torch.empty(batch, *cfg.latent_shape)
        coeffs = torch.empty(batch, 4)
    z_image = model.encode_image(image).detach()
    return PipelineFlops(
        encoder=count_flops(lambda: model.encode_image(image)),
        step=count_flops(lambda: model.step(z, z_image, coeffs, torch.empty_like(z))),
        decoder=count_flops(lambda: model.label_decoder(z)),
    )
