"""FLOPs per stage, counted (not estimated) with torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions (transposed included),
matmuls/linears, batched matmuls and scaled-dot-product attention; element-wise work (norms,
activations, bias adds, the sampler update, argmax) is not counted, so achieved GFLOP/s is a
lower bound on the arithmetic actually done. The model is built on the meta device: shapes only,
no weights, no compute.

Two counts: the reference model (what torch eager runs; the issue's "compute floor" is this count
at the machine's peak), and with `phase=True` what the exported graphs run (nearest-x2 + conv
upsampling in its phase form, see ldseg.model.layers.Upsample: fewer multiply-adds, same function).
Rates and roofline ratios use the reference count for every backend, so they read as "fraction of
the floor": time at peak for the reference FLOPs divided by the measured time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldseg.model.config import ModelConfig
from ldseg.model.layers import phase_upsampling
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
        return {
            "input_copy": 0,
            "encoder": self.encoder,
            "step": self.step,
            "loop": steps * self.step,
            "decoder": self.decoder,
            "output_copy": 0,
        }

    def end_to_end(self, steps: int) -> int:
        return self.encoder + steps * self.step + self.decoder


@cache
def pipeline_flops(cfg: ModelConfig, batch: int, phase: bool = False) -> PipelineFlops:
    with torch.device("meta"):
        model = LDSeg(cfg).eval()
        image = torch.empty(batch, *cfg.image_shape)
        z = torch.empty(batch, *cfg.latent_shape)
        coeffs = torch.empty(batch, 4)
    z_image = model.encode_image(image).detach()
    if phase:
        with phase_upsampling(model):
            return _count(model, image, z, z_image, coeffs)
    return _count(model, image, z, z_image, coeffs)


def _count(
    model: LDSeg, image: torch.Tensor, z: torch.Tensor, z_image: torch.Tensor, coeffs: torch.Tensor
) -> PipelineFlops:
    return PipelineFlops(
        encoder=count_flops(lambda: model.encode_image(image)),
        step=count_flops(lambda: model.step(z, z_image, coeffs, torch.empty_like(z))),
        decoder=count_flops(lambda: model.label_decoder(z)),
    )
