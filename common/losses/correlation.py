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

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``pred``, ``target``: ``[B, C, ...]`` of one shape; ``mask``: voxel weights in ``[0, 1]`` of that shape with
        one channel (the correlation of the voxels inside it), or None."""
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}.")
        x, y = pred.flatten(1), target.flatten(1)
        if mask is None:

            def mean(v: torch.Tensor) -> torch.Tensor:
                return v.mean(1, keepdim=True)

        else:
            w = mask.to(pred).expand_as(pred).flatten(1)
            total = w.sum(1, keepdim=True).clamp(min=self.eps)

            def mean(v: torch.Tensor) -> torch.Tensor:
                return (w * v).sum(1, keepdim=True) / total

        a, b = x - mean(x), y - mean(y)
        ncc = (mean(a * b) / torch.sqrt((mean(a.pow(2)) + self.eps) * (mean(b.pow(2)) + self.eps)))[:, 0]
        return reduce_negated(ncc, self.reduction)
