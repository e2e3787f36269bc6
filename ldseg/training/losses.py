"""Losses of the official trainer (utilities/trainer3D.py) and the Dice used for validation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_EPS = 1e-6
DICE_WEIGHT = 2.0  # official reconstructionLoss: CE + gamma * (1 - Dice), gamma = 2


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *grid) class ids -> (B, K, *grid) float."""
    return F.one_hot(label.long(), num_classes).movedim(-1, 1).to(torch.float32)


def soft_dice(probs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Official `dice_coef`: one global soft Dice over batch, classes (background included) and
    voxels: 2 * sum(y * p) / (sum(y) + sum(p) + eps)."""
    y = one_hot(label, probs.shape[1])
    return 2.0 * (y * probs).sum() / (y.sum() + probs.sum() + DICE_EPS)


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """CE + 2 * (1 - Dice) on decoder logits (B, K, *grid) against class ids (B, *grid).

    The official decoder ends in softmax and Keras' sparse CE takes log of the probabilities;
    cross_entropy on the logits is the same quantity without the log(softmax) round trip."""
    ce = F.cross_entropy(logits, label.long())
    return ce + DICE_WEIGHT * (1.0 - soft_dice(torch.softmax(logits, dim=1), label))


def noise_loss(eps: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Official loss2: mean squared error between the drawn and the predicted noise."""
    return F.mse_loss(predicted, eps)


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard Dice per sample and foreground class: (B, *grid) ids -> (B, K-1).

    A class absent from both prediction and truth scores 1 (nothing to find, nothing found)."""
    out = torch.empty(pred.shape[0], num_classes - 1, dtype=torch.float64)
    for c in range(1, num_classes):
        p = (pred == c).reshape(pred.shape[0], -1)
        t = (label == c).reshape(label.shape[0], -1)
        inter = (p & t).sum(dim=1).double()
        total = (p.sum(dim=1) + t.sum(dim=1)).double()
        out[:, c - 1] = torch.where(total > 0, 2.0 * inter / total.clamp(min=1), torch.ones_like(total))
    return out
