"""Noise schedules and the DDIM/DDPM samplers of the official release, as plain numpy tables.

A sampler is precomputed into a (steps, 4) table of [t, a, b, c] so that one reverse step is

    z <- renormalize(a * z + b * eps_theta(z, z_image, t) + c * noise)

which is data in, data out: the same table drives PyTorch, the fused ONNX step and every runtime.
Renormalization is per sample (the official code normalizes over the whole batch; at batch 1 the two
are identical, and per-sample is what lets K samples run as one batch).

numpy only, no torch: this is what the runtime samples with (a runtime-only install has no PyTorch).
The PyTorch model's tensor versions of the step live in ldseg.model.diffusion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ldseg.model.config import DiffusionConfig

RENORM_EPS = 1e-5  # official mean_variance_normalization: (x - mean) / (std + 1e-5)


def cosine_alpha_bar(t: np.ndarray, timesteps: int, s: float = 0.008) -> np.ndarray:
    """Official cosineFunc(t) / cosineFunc(0); defined for fractional t."""

    def f(x: np.ndarray) -> np.ndarray:
        return np.cos(((x / timesteps + s) / (1 + s)) * (np.pi / 2)) ** 2

    return f(np.asarray(t, dtype=np.float64)) / f(np.zeros(1))


def alpha_bar_table(cfg: DiffusionConfig) -> np.ndarray:
    """alpha_bar at the integer training timesteps 0..T-1 (official GaussianDiffusion3D)."""
    times = np.arange(cfg.timesteps, dtype=np.float64)
    if cfg.schedule == "cosine":
        return cosine_alpha_bar(times, cfg.timesteps)
    if cfg.schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=np.float64)
    elif cfg.schedule == "quadratic":
        betas = np.linspace(cfg.beta_end**0.5, cfg.beta_start**0.5, cfg.timesteps)[::-1] ** 2
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    return np.cumprod(1.0 - betas)


def alpha_bar_at(cfg: DiffusionConfig, t: np.ndarray) -> np.ndarray:
    """alpha_bar at fractional sampling times: exact for cosine, interpolated otherwise."""
    if cfg.schedule == "cosine":
        return cosine_alpha_bar(t, cfg.timesteps)
    return np.interp(t, np.arange(cfg.timesteps), alpha_bar_table(cfg))


def sampling_times(cfg: DiffusionConfig, steps: int | None = None) -> np.ndarray:
    """Official `noiseScheduler`: N evenly spaced (fractional) times in [0, T-1]."""
    return np.linspace(0, cfg.timesteps - 1, steps or cfg.steps)


@dataclass(frozen=True)
class SamplerTable:
    """Rows in execution order (t = T-1 first): columns t, a, b, c (float64)."""

    rows: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.rows.shape[0])


def sampler_table(cfg: DiffusionConfig, steps: int | None = None, sampler: str | None = None) -> SamplerTable:
    """The official sampler3D.segment loop, rewritten as z <- a*z + b*eps + c*noise per step."""
    sampler = sampler or cfg.sampler
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {sampler!r}")
    times = sampling_times(cfg, steps)
    alpha_bar = alpha_bar_at(cfg, times)
    rows = []
    for i in reversed(range(len(times))):
        if i == 0:
            # Last step: the x0 prediction plus sqrt(beta_0) noise, beta_0 = 1 - alpha_bar[0] / 1.
            beta = 1.0 - alpha_bar[0]
            a = 1.0 / np.sqrt(alpha_bar[0])
            b = -np.sqrt(1.0 - alpha_bar[0]) / np.sqrt(alpha_bar[0])
            c = np.sqrt(max(beta, 0.0))
        else:
            # DDIM (Song et al. 2021) eq. 12: z_prev = sqrt(ab_prev) * x0_pred + sqrt(1 - ab_prev - sigma^2) * eps
            # + sigma * noise, x0_pred = (z - sqrt(1 - ab) * eps) / sqrt(ab); eq. 16 with eta = 1 gives the
            # DDPM sigma, eta = 0 (sigma = 0) deterministic DDIM.
            ab, ab_prev = alpha_bar[i], alpha_bar[i - 1]
            sigma = np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) if sampler == "ddpm" else 0.0
            a = np.sqrt(ab_prev) / np.sqrt(ab)
            b = -np.sqrt(ab_prev) * np.sqrt(1 - ab) / np.sqrt(ab) + np.sqrt(max(1 - ab_prev - sigma**2, 0.0))
            c = sigma
        rows.append((times[i], a, b, c))
    return SamplerTable(np.asarray(rows, dtype=np.float64))


Latent = TypeVar("Latent")


def denoise_loop(z: Latent, steps: int, step: Callable[[Latent, int], Latent]) -> Latent:
    """The sampling loop, the one definition the PyTorch model and every backend run:
    z <- step(z, i) for the table rows i = 0..steps-1 (t = T-1 first). What a latent is, a tensor
    or the index of the ping-pong buffer that holds it, is the caller's business."""
    for i in range(steps):
        z = step(z, i)
    return z


# What a seed produces. Version 2: numpy's Philox generator (version 1 was torch.Generator's Mersenne
# Twister, which needed PyTorch at run time). Part of every run key (ldseg.runs.outputs.run_key), so a
# manifest row made with other noise never counts as done.
NOISE_VERSION = 2


def seed_generator(seed: int) -> np.random.Generator:
    """The generator behind one sample: Philox (counter-based, the same stream on every platform)."""
    return np.random.Generator(np.random.Philox(int(seed)))


def renormalize(z: np.ndarray) -> np.ndarray:
    """Zero mean, unit (population) std per sample, in z's dtype (float32)."""
    flat = z.reshape(z.shape[0], -1)
    mean = flat.mean(axis=1, keepdims=True)
    std = np.sqrt(((flat - mean) ** 2).mean(axis=1, keepdims=True))
    return ((flat - mean) / (std + z.dtype.type(RENORM_EPS))).reshape(z.shape)


def draw_noise(seeds: list[int], steps: int, latent_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Initial latents (B, *latent) and per-step noise (steps, B, *latent), float32, one generator per
    seed, so a sample depends only on its own seed (batch of K == K single runs) on any backend."""
    initial, noise = [], []
    for seed in seeds:
        gen = seed_generator(seed)
        initial.append(gen.standard_normal(latent_shape, dtype=np.float32))
        noise.append(gen.standard_normal((steps, *latent_shape), dtype=np.float32))
    return renormalize(np.stack(initial)), np.ascontiguousarray(np.stack(noise, axis=1))
