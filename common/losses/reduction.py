"""The reductions shared by the collection's similarity losses."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.utils import LossReduction

__all__ = ["MaskedVoxelMean", "reduce_negated"]


def reduce_negated(similarity: torch.Tensor, reduction: str) -> torch.Tensor:
    """``-similarity`` reduced as MONAI losses do: ``"mean"``, ``"sum"``, or ``"none"`` (unreduced)."""
    if reduction == LossReduction.MEAN.value:
        return -similarity.mean()
    if reduction == LossReduction.SUM.value:
        return -similarity.sum()
    return -similarity


class MaskedVoxelMean(nn.Module):
    """The mean of a voxel-wise loss over the image, or, given ``mask``, over the voxels inside it (weighted by it): a
    MONAI loss that has no mask argument, such as :class:`~monai.losses.LocalNormalizedCrossCorrelationLoss`, built
    with ``reduction="none"`` so that it returns its voxel map ``[B, C, X, Y, Z]``.

    Args:
        loss: the voxel-wise loss ``(pred, target) -> [B, C, X, Y, Z]``.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        if getattr(loss, "reduction", LossReduction.NONE.value) != LossReduction.NONE.value:
            raise ValueError(f"the loss must keep its voxel map (reduction='none'), got reduction={loss.reduction!r}.")
        self.loss = loss

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``pred``, ``target``: ``[B, C, X, Y, Z]``; ``mask``: ``[B, 1, X, Y, Z]`` weights in ``[0, 1]``, or None."""
        values = self.loss(pred, target)
        if mask is None:
            return values.mean()
        weights = mask.to(values).expand_as(values)
        return (values * weights).sum() / weights.sum().clamp_min(1e-6)
