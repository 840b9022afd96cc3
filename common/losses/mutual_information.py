"""Differentiable mutual information of groups of samples (Parzen windows), and the local and multi-axis MI losses
built on it.

MONAI's ``GlobalMutualInformationLoss`` estimates one joint histogram for the whole image. Here the histogram is
estimated for many groups at once (patches of a volume, or any other grouping of samples), as one batched matrix
product, so that no Python loop runs over the groups.
"""

from __future__ import annotations

import math

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from .reduction import reduce_negated

__all__ = [
    "LocalMutualInformationLoss",
    "MultiAxisMutualInformationLoss",
    "grouped_mutual_information",
    "parzen_weights",
    "patch_groups",
]


def parzen_weights(x: torch.Tensor, num_bins: int = 16, sigma_ratio: float = 0.5) -> torch.Tensor:
    """Soft histogram membership of intensities ``x`` ``[..., N]`` in ``[0, 1]`` -> ``[..., N, num_bins]``.

    Bin centres are ``(k + 0.5) / num_bins``; each sample spreads over the bins by a Gaussian of standard deviation
    ``sigma_ratio`` bin widths, normalised to sum to one, so every sample counts once.
    """
    centres = (torch.arange(num_bins, device=x.device, dtype=x.dtype) + 0.5) / num_bins
    sigma = sigma_ratio / num_bins
    logits = -((x.clamp(0, 1).unsqueeze(-1) - centres) ** 2) / (2 * sigma**2)
    return torch.softmax(logits, dim=-1)


def grouped_mutual_information(
    a: torch.Tensor, b: torch.Tensor, num_bins: int = 16, sigma_ratio: float = 0.5, eps: float = 1e-10
) -> torch.Tensor:
    """Mutual information (nats) between ``a`` and ``b`` within each group: ``[..., N]`` -> ``[...]``.

    Args:
        a, b: intensities in ``[0, 1]``; the last dimension holds the ``N`` paired samples of a group.
        num_bins: histogram bins per image.
        sigma_ratio: Parzen window width in bins.
        eps: added inside the logarithms, which keeps gradients finite for empty bins.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return _weights_mutual_information(
        parzen_weights(a, num_bins, sigma_ratio), parzen_weights(b, num_bins, sigma_ratio), eps
    )


def _weights_mutual_information(
    wa: torch.Tensor, wb: torch.Tensor, eps: float = 1e-10, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mutual information (nats) from paired Parzen weights ``[..., N, bins]`` of two images -> ``[...]``; with a
    ``mask`` ``[..., N]`` (weights in ``[0, 1]``), each sample counts by its weight."""
    if mask is None:
        joint = wa.transpose(-1, -2) @ wb / wa.shape[-2]  # [..., bins, bins]
    else:
        total = mask.sum(-1).clamp(min=eps)[..., None, None]
        joint = (wa * mask[..., None]).transpose(-1, -2) @ wb / total
    pa, pb = joint.sum(-1), joint.sum(-2)
    h_ab = -(joint * torch.log(joint + eps)).sum((-1, -2))
    h_a = -(pa * torch.log(pa + eps)).sum(-1)
    h_b = -(pb * torch.log(pb + eps)).sum(-1)
    return h_a + h_b - h_ab


def patch_groups(x: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Cubic patches of ``x`` ``[B, C, X, Y, Z]`` as groups ``[B, C, P, patch_size**3]``.

    Patch origins are every ``stride`` voxels from the first voxel; voxels beyond the last full patch are left out.
    """
    if min(x.shape[2:]) < patch_size:
        raise ValueError(f"image shape {tuple(x.shape[2:])} is smaller than the patch size {patch_size}.")
    patches = x.unfold(2, patch_size, stride).unfold(3, patch_size, stride).unfold(4, patch_size, stride)
    return patches.reshape(*x.shape[:2], -1, patch_size**3)


class LocalMutualInformationLoss(_Loss):
    """Negative mutual information averaged over local patches, for multimodal registration.

    Inputs are intensities in ``[0, 1]`` (values outside are clamped), either volumes ``[B, 1, X, Y, Z]``, cut into
    cubic patches every ``stride`` voxels, or samples ``[B, 1, N]`` already grouped by patch: ``N`` is a multiple of
    ``patch_size**3`` and each run of ``patch_size**3`` consecutive samples is one patch (what
    :class:`common.engine.InstanceOptimizationInferer` passes when it samples random patches).

    Args:
        num_bins: histogram bins per image (the Neural ODE paper: 16).
        patch_size: patch edge in voxels.
        overlap: fraction of a patch shared with its neighbour along each axis, in ``[0, 1)``; 0 tiles the volume.
        sigma_ratio: Parzen window width in bins.
        reduction: ``"mean"`` over patches and batch, ``"sum"``, or ``"none"`` for the map ``[B, P]``.
    """

    def __init__(
        self,
        num_bins: int = 16,
        patch_size: int = 5,
        overlap: float = 0.0,
        sigma_ratio: float = 0.5,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if num_bins < 2 or patch_size < 2:
            raise ValueError(f"need num_bins >= 2 and patch_size >= 2, got {num_bins} and {patch_size}.")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
        self.num_bins, self.patch_size, self.sigma_ratio = num_bins, patch_size, sigma_ratio
        self.stride = max(1, math.floor(patch_size * (1 - overlap) + 0.5))

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"local mutual information compares one channel, got {x.shape[1]}.")
        if x.ndim == 5:
            return patch_groups(x, self.patch_size, self.stride)[:, 0]
        n = self.patch_size**3
        if x.ndim != 3 or x.shape[-1] % n:
            raise ValueError(f"expected [B, 1, X, Y, Z] or [B, 1, k * {n}] samples, got {tuple(x.shape)}.")
        return x.reshape(x.shape[0], -1, n)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-LMI`` of ``pred`` (warped moving) and ``target`` (fixed), in nats."""
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}.")
        mi = grouped_mutual_information(self._groups(pred), self._groups(target), self.num_bins, self.sigma_ratio)
        return reduce_negated(mi, self.reduction)


class MultiAxisMutualInformationLoss(_Loss):
    """Negative mutual information of corresponding 2D slices, averaged over the slices along each axis and the axes.

    Each slice has its own joint histogram, so the intensity relation between the two images may drift from slice to
    slice (a bias field, a slab profile), as in the multi-axis MI of the TTO-KD paper. All slices of an axis are one
    batched :func:`grouped_mutual_information`. Inputs are intensities in ``[0, 1]`` (clamped), ``[B, 1, X, Y, Z]``.

    Args:
        num_bins: histogram bins per image (not published; 8 keeps a 2D slice's histogram well filled).
        sigma_ratio: Parzen window width in bins.
        axes: the spatial axes (0, 1, 2 for X, Y, Z) whose slices are compared.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` for ``[B]``.
    """

    def __init__(
        self,
        num_bins: int = 8,
        sigma_ratio: float = 0.5,
        axes: tuple[int, ...] = (0, 1, 2),
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if num_bins < 2:
            raise ValueError(f"need num_bins >= 2, got {num_bins}.")
        if not axes or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"axes must be a non-empty subset of (0, 1, 2), got {axes}.")
        self.num_bins, self.sigma_ratio, self.axes = num_bins, sigma_ratio, tuple(axes)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``-MI`` of ``pred`` (warped moving) and ``target`` (fixed), in nats, averaged over slices and axes; with a
        ``mask`` ``[B, 1, X, Y, Z]`` (weights in ``[0, 1]``), over the voxels inside it, each slice weighted by its
        share of the mask."""
        if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] != 1:
            raise ValueError(
                f"expected pred and target of one shape [B, 1, X, Y, Z], got {tuple(pred.shape)} and {tuple(target.shape)}."
            )
        # the Parzen weights of a voxel are the same whichever axis its slice is cut along, so they are computed once
        wa, wb = (
            parzen_weights(x[:, 0], self.num_bins, self.sigma_ratio) for x in (pred, target)
        )  # [B, X, Y, Z, bins]
        per_axis = []
        for axis in self.axes:
            a, b = (w.movedim(axis + 1, 1).flatten(2, 3) for w in (wa, wb))  # [B, slices, slice voxels, bins]
            if mask is None:
                per_axis.append(_weights_mutual_information(a, b).mean(1))
                continue
            m = mask[:, 0].to(a).movedim(axis + 1, 1).flatten(2)  # [B, slices, slice voxels]
            share = m.sum(-1) / m.sum((1, 2)).clamp(min=1e-10)[:, None]
            per_axis.append((_weights_mutual_information(a, b, mask=m) * share).sum(1))
        mi = torch.stack(per_axis, 1).mean(1)
        return reduce_negated(mi, self.reduction)
