"""Exponential moving average of a module's weights (official: EMA 0.999 of the denoiser)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

WARMUP = 10.0  # decay(n) = min(decay, (1 + n) / (WARMUP + n)), n = updates so far


class EMA:
    """shadow <- d * shadow + (1 - d) * weight after each optimizer step.

    The official code uses a fixed d = 0.999; on a run of a few thousand steps that leaves a large
    share (0.999^n) of the random initialization in the average. The warm-up of TensorFlow's
    ExponentialMovingAverage(num_updates) fixes that: d(n) = min(d, (1 + n) / (10 + n)), which
    equals d once n is large, so long runs get the official behaviour.
    """

    def __init__(self, module: nn.Module, decay: float, updates: int = 0):
        self.decay = float(decay)
        self.updates = int(updates)
        # Floating-point state only (parameters and float buffers); the denoiser has no others.
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1.0 + updates) / (WARMUP + updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.decay_at(self.updates)
        state = module.state_dict()
        for name, avg in self.shadow.items():
            avg.mul_(d).add_(state[name].detach(), alpha=1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        state = module.state_dict()
        for name, avg in self.shadow.items():
            state[name].copy_(avg)

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the averaged weights into `module` (for validation and saving)."""
        backup = {k: v.detach().clone() for k, v in module.state_dict().items() if k in self.shadow}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                state = module.state_dict()
                for name, value in backup.items():
                    state[name].copy_(value)
