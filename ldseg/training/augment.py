"""Simple augmentations, drawn from an explicit generator so a step's draws depend only on
(seed, step).

The intensity change is applied *after* min-max: before it, any scale/shift would be undone by the
model's own min-max (LDSeg.encode_image), so it would augment nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE = (0.9, 1.1)  # contrast
SHIFT = (-0.05, 0.05)  # brightness, in units of the [0, 1] range


@dataclass(frozen=True)
class Draw:
    """One sample's augmentation: spatial axes to flip (0-based, in the grid) and intensity."""

    flips: tuple[int, ...]
    scale: float
    shift: float


def draw(gen: torch.Generator, spatial_dims: int, flips: bool, intensity: bool) -> Draw:
    # Always consume the same number of draws, so toggling one option leaves the other unchanged.
    u = torch.rand(spatial_dims + 2, generator=gen).tolist()
    axes = tuple(i for i in range(spatial_dims) if flips and u[i] < 0.5)
    if not intensity:
        return Draw(axes, 1.0, 0.0)
    scale = SCALE[0] + (SCALE[1] - SCALE[0]) * u[spatial_dims]
    shift = SHIFT[0] + (SHIFT[1] - SHIFT[0]) * u[spatial_dims + 1]
    return Draw(axes, scale, shift)


def apply_image(image: torch.Tensor, d: Draw) -> torch.Tensor:
    """(C, *grid) in [0, 1] -> augmented image (flips, then contrast/brightness)."""
    out = torch.flip(image, dims=[1 + a for a in d.flips]) if d.flips else image
    return out * d.scale + d.shift if (d.scale, d.shift) != (1.0, 0.0) else out


def apply_label(label: torch.Tensor, d: Draw) -> torch.Tensor:
    """(*grid) class ids -> flipped the same way as the image."""
    return torch.flip(label, dims=list(d.flips)) if d.flips else label
