"""Global normalised cross-correlation (MONAI has only the local, windowed form)."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from .reduction import reduce_negated

__all__ = ["GlobalNormalizedCrossCorrelationLoss"]


class GlobalNormalizedCrossCorrelationLoss(_Loss):
    """Negative Pearson correlation of two images over all their voxels: ``-cov(a, b) / (std(a) std(b))``.

    In ``[-1, 1]``; -1 when one image is an increasing affine function of the other. Suited to one contrast (a time
    series), not to pairs whose intensity relation is not monotone.

    Args:
        eps: added to the variances, so that a constant image gives 0 rather than NaN.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """

    def __init__(self, eps: float = 1e-8, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred``, ``target``: ``[B, C, ...]`` of one shape."""
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}.")
        a = pred.flatten(1) - pred.flatten(1).mean(1, keepdim=True)
        b = target.flatten(1) - target.flatten(1).mean(1, keepdim=True)
        ncc = (a * b).mean(1) / torch.sqrt((a.pow(2).mean(1) + self.eps) * (b.pow(2).mean(1) + self.eps))
        return reduce_negated(ncc, self.reduction)
