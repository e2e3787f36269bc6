"""The sampler's tensor side for the PyTorch model and training: renormalize, one reverse step, and
forward diffusion, over torch tensors. The tables, the loop and the noise are numpy, in
ldseg.model.sampling (re-exported here for the model's code)."""

from __future__ import annotations

import torch

from ldseg.model.sampling import (  # noqa: F401  (re-exported for the PyTorch side)
    RENORM_EPS,
    SamplerTable,
    alpha_bar_at,
    alpha_bar_table,
    cosine_alpha_bar,
    denoise_loop,
    sampler_table,
    sampling_times,
)
from ldseg.model.sampling import draw_noise as draw_noise_numpy


def table_tensor(table: SamplerTable, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(table.rows, dtype=torch.float32, device=device)


def renormalize(z: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (population) std per sample."""
    flat = z.reshape(z.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = (flat - mean).pow(2).mean(dim=1, keepdim=True).sqrt()
    return ((flat - mean) / (std + RENORM_EPS)).reshape(z.shape)


def sampler_step(z: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """One reverse step; `coeffs` is a table row [t, a, b, c] (shape (4,) or (B, 4))."""
    c = coeffs.reshape(-1, 4, *([1] * (z.dim() - 1)))
    return renormalize(c[:, 1] * z + c[:, 2] * eps + c[:, 3] * noise)


def q_sample(z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion at integer timesteps t (training)."""
    ab = alpha_bar[t].reshape(-1, *([1] * (z0.dim() - 1)))
    return ab.sqrt() * z0 + (1 - ab).sqrt() * noise


def draw_noise(seeds: list[int], steps: int, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """ldseg.model.sampling.draw_noise as CPU tensors: the same numbers every backend gets."""
    z, noise = draw_noise_numpy(seeds, steps, latent_shape)
    return torch.from_numpy(z), torch.from_numpy(noise)
