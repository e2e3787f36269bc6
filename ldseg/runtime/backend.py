"""The one interface every runtime backend implements (torch, onnxruntime, tensorrt).

A backend runs the whole pipeline — image encoder, N fused sampler steps, label decoder — on data
that the caller prepared once with `make_inputs`: every backend sees the same initial latents,
per-step noise and coefficient table, so their results are comparable voxel for voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ldseg.model.config import ModelConfig
from ldseg.model.diffusion import draw_noise, sampler_table


@dataclass(frozen=True)
class PipelineInputs:
    image: np.ndarray  # (B, C, *grid) float32, on the model grid
    z_init: np.ndarray  # (B, 1, *latent) float32, renormalized noise
    noise: np.ndarray  # (steps, B, 1, *latent) float32 (multiplied by 0 under DDIM)
    table: np.ndarray  # (steps, 4) float32 rows [t, a, b, c] in execution order

    @property
    def batch(self) -> int:
        return int(self.image.shape[0])

    @property
    def steps(self) -> int:
        return int(self.table.shape[0])


@dataclass
class PipelineOutputs:
    labels: np.ndarray  # (B, *grid) uint8
    probabilities: np.ndarray | None = None  # (B, K, *grid) float32 when asked for
    stage_ms: dict[str, float] = field(default_factory=dict)  # wall/GPU time per stage


class Backend(Protocol):
    name: str  # "torch", "onnxruntime", "tensorrt"
    device: str  # "cpu", "cuda"
    precision: str  # "fp32", "fp16", "int8", ...

    def run(self, inputs: PipelineInputs, *, probabilities: bool = False) -> PipelineOutputs:
        """Run the pipeline. Buffers are allocated on the first call for a (batch, steps) and reused."""
        ...

    def describe(self) -> dict[str, str]:
        """What was chosen and why, for the CLI and benchmark records."""
        ...


def check_inputs(inputs: PipelineInputs, cfg: ModelConfig, owner: str) -> None:
    """ValueError naming the array whose shape does not fit `cfg` (owner: what expects it)."""
    n, b = inputs.steps, inputs.batch
    expected = {
        "image": (inputs.image.shape, (b, *cfg.image_shape)),
        "z_init": (inputs.z_init.shape, (b, *cfg.latent_shape)),
        "noise": (inputs.noise.shape, (n, b, *cfg.latent_shape)),
        "table": (inputs.table.shape, (n, 4)),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"{name} has shape {tuple(got)}, {owner} expects {want}")


def make_inputs(
    cfg: ModelConfig,
    image: np.ndarray,
    seeds: list[int],
    steps: int | None = None,
    sampler: str | None = None,
) -> PipelineInputs:
    if image.shape[1:] != cfg.image_shape:
        raise ValueError(f"image of shape {image.shape[1:]} for a model expecting {cfg.image_shape}")
    if len(seeds) != image.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {image.shape[0]}")
    table = sampler_table(cfg.diffusion, steps, sampler)
    z_init, noise = draw_noise(seeds, table.steps, cfg.latent_shape)
    return PipelineInputs(
        image=np.ascontiguousarray(image, dtype=np.float32),
        z_init=z_init.numpy(),
        noise=noise.numpy(),
        table=table.rows.astype(np.float32),
    )
