"""LDSeg: the four components and the reference (PyTorch FP32) sampling pipeline."""

from __future__ import annotations

import torch
from torch import nn

from ldseg.model.components import Denoiser, ImageEncoder, LabelDecoder, LabelEncoder
from ldseg.model.config import ModelConfig
from ldseg.model.diffusion import denoise_loop, draw_noise, sampler_step, sampler_table, table_tensor
from ldseg.model.layers import reduced

COMPONENTS = ("label_encoder", "label_decoder", "image_encoder", "denoiser")


def minmax(image: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max to [0, 1] (official `standardize`); a constant image maps to 0."""
    flat = image.reshape(image.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    out = (flat - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return out.reshape(image.shape)


class FusedStep(nn.Module):
    """One whole sampler step: denoiser + DDIM/DDPM update + per-sample renormalization.

    `coeffs` is a (B, 4) slice of the sampler table ([t, a, b, c]): exported as one ONNX graph so a
    runtime's loop is N calls of one engine and nothing else."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(
        self, z: torch.Tensor, z_image: torch.Tensor, coeffs: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        eps = self.denoiser(z, z_image, coeffs[:, 0])
        if reduced(eps):  # autocast: the update and the renormalization stay FP32, like z
            eps = eps.to(z.dtype)
        return sampler_step(z, eps, noise, coeffs)


class LDSeg(nn.Module):
    def __init__(self, cfg: ModelConfig, trained: dict[str, bool] | None = None):
        super().__init__()
        self.cfg = cfg
        self.label_encoder = LabelEncoder(cfg)
        self.label_decoder = LabelDecoder(cfg)
        self.image_encoder = ImageEncoder(cfg)
        self.denoiser = Denoiser(cfg)
        self.step = FusedStep(self.denoiser)
        # Which components hold real weights (an official import has no denoiser).
        self.trained = dict(trained or {name: False for name in COMPONENTS})
        self.checkpoint_hash: str | None = None  # set by load_checkpoint

    def untrained(self, needed: tuple[str, ...] = COMPONENTS) -> list[str]:
        return [name for name in needed if not self.trained.get(name, False)]

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(minmax(image))

    def encode_label(self, label: torch.Tensor) -> torch.Tensor:
        """Label map (B, *grid) of class ids -> label latent."""
        return self.label_encoder(label.to(torch.float32).unsqueeze(1))

    @torch.no_grad()
    def sample_latent(
        self, z_image: torch.Tensor, seeds: list[int], steps: int | None = None, sampler: str | None = None
    ) -> torch.Tensor:
        table = sampler_table(self.cfg.diffusion, steps, sampler)
        z, noise = draw_noise(seeds, table.steps, self.cfg.latent_shape)
        z, noise = z.to(z_image.device), noise.to(z_image.device)
        rows = table_tensor(table, z_image.device).unsqueeze(1).expand(-1, z.shape[0], 4)  # (steps, B, 4)
        return denoise_loop(z, table.steps, lambda z_i, i: self.step(z_i, z_image, rows[i], noise[i]))

    @torch.no_grad()
    def segment(
        self, image: torch.Tensor, seeds: list[int], steps: int | None = None, sampler: str | None = None
    ) -> torch.Tensor:
        """Image (B, C, *grid) -> class probabilities (B, K, *grid); one seed per sample."""
        if len(seeds) != image.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {image.shape[0]}")
        z = self.sample_latent(self.encode_image(image), seeds, steps, sampler)
        return self.label_decoder(z)

    @torch.no_grad()
    def reconstruct(self, label: torch.Tensor) -> torch.Tensor:
        """Debug path: encode a label map and decode it (no denoiser involved)."""
        return self.label_decoder(self.encode_label(label))
