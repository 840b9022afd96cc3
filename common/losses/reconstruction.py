"""Losses between a predicted image and a target image of the same contrast (image synthesis)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["IntensityGradientL1Loss"]


class IntensityGradientL1Loss(nn.Module):
    """``mean|pred - target| + gradient_weight * sum_axes mean|d pred - d target|`` for images ``[B, C, X, Y, Z]``
    (forward differences along each spatial axis): the intensity and edge terms Brain-ID trains its T1 head with.

    Args:
        gradient_weight: weight of the edge term (non-negative).
    """

    def __init__(self, gradient_weight: float = 1.0) -> None:
        super().__init__()
        if gradient_weight < 0:
            raise ValueError(f"gradient_weight must not be negative, got {gradient_weight}.")
        self.gradient_weight = float(gradient_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape.")
        loss = (pred - target).abs().mean()
        if self.gradient_weight:
            edges = [(torch.diff(pred, dim=d) - torch.diff(target, dim=d)).abs().mean() for d in range(2, pred.ndim)]
            loss = loss + self.gradient_weight * torch.stack(edges).sum()
        return loss
