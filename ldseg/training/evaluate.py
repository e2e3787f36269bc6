"""Dice of the full sampling pipeline (validation during training, and the demo model's check)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ldseg.model.network import LDSeg
from ldseg.training.losses import dice_per_class

CHUNK = 4  # samples per segment() call: bounds memory at full-resolution decoding


@torch.no_grad()
def sampled_dice(
    model: LDSeg,
    images: torch.Tensor,
    labels: torch.Tensor,
    seeds: Sequence[int],
    steps: int | None = None,
) -> torch.Tensor:
    """(N, K-1) hard Dice per sample and foreground class after `LDSeg.segment` (DDIM,
    `steps` defaults to the config's 15) and argmax. `images` (N, C, *grid), `labels` (N, *grid)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, images.shape[0], CHUNK):
        probs = model.segment(images[i : i + CHUNK].to(device), list(seeds[i : i + CHUNK]), steps)
        pred = probs.argmax(dim=1).cpu()
        out.append(dice_per_class(pred, labels[i : i + CHUNK], model.cfg.num_classes))
    return torch.cat(out)


@torch.no_grad()
def reconstruction_dice(model: LDSeg, labels: torch.Tensor) -> torch.Tensor:
    """(N, K-1) Dice of decoder(encoder(label)): the ceiling the diffusion part can reach."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, labels.shape[0], CHUNK):
        pred = model.reconstruct(labels[i : i + CHUNK].to(device)).argmax(dim=1).cpu()
        out.append(dice_per_class(pred, labels[i : i + CHUNK], model.cfg.num_classes))
    return torch.cat(out)


def summarize(dice: torch.Tensor) -> dict[str, float]:
    """(N, K-1) -> {"1": mean over samples, ..., "mean": mean over classes}."""
    per_class = dice.mean(dim=0)
    out = {str(c + 1): float(v) for c, v in enumerate(per_class)}
    out["mean"] = float(per_class.mean())
    return out


def evaluate_demo(model: LDSeg, seeds: Sequence[int] = tuple(range(10)), steps: int | None = None) -> dict[str, Any]:
    """Segment phantoms `seeds` (sampling seed = phantom seed, 15 DDIM steps by default) on the
    min-max'ed phantom image through `LDSeg.segment`; Dice per foreground class.

    Returns {"seeds", "per_seed": [{"seed", "dice": {"1", "2"}, "mean"}], "per_class": {"1", "2"},
    "mean"}; "mean" averages the per-class means. Seeds 0..999 are never used for training.
    """
    from ldseg.data.phantoms import make_phantom

    model = model.eval()
    cfg = model.cfg
    seeds = [int(s) for s in seeds]
    phantoms = [make_phantom(s, shape=cfg.image_size, num_classes=cfg.num_classes) for s in seeds]
    # LDSeg.encode_image min-maxes per sample itself; the raw intensities can go in as they are,
    # but min-max here too so the input is exactly what a preprocessed file would give.
    images = torch.stack([torch.from_numpy(_minmax(p.image)) for p in phantoms])[:, None]
    images = images.expand(-1, cfg.image_channels, *cfg.image_size)
    labels = torch.stack([torch.from_numpy(p.label.astype(np.int64)) for p in phantoms])
    dice = sampled_dice(model, images, labels, seeds, steps)
    per_seed = [
        {"seed": s, "dice": {str(c + 1): float(d[c]) for c in range(d.shape[0])}, "mean": float(d.mean())}
        for s, d in zip(seeds, dice)
    ]
    summary = summarize(dice)
    mean = summary.pop("mean")
    return {"seeds": seeds, "per_seed": per_seed, "per_class": summary, "mean": mean}


def _minmax(array: np.ndarray) -> np.ndarray:
    x = np.asarray(array, dtype=np.float32)
    x = x - x.min()
    return x / x.max() if x.max() > 0 else x
