"""Normalised mutual information between two images on one grid: over a region, and per patch (PMM)."""

from __future__ import annotations

import numpy as np
import torch
from monai.utils import convert_to_tensor

from .percentiles import percentiles

__all__ = ["normalized_mutual_information", "patchwise_mi_map"]


def _volume(x: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """Plain tensor with leading singleton (batch/channel) dims removed."""
    t = convert_to_tensor(x, track_meta=False, device=device)
    while t.ndim > 3 and t.shape[0] == 1:
        t = t[0]
    return t


def _bin_indices(image: torch.Tensor, bins: int) -> torch.Tensor:
    """Hard bin index in [0, bins) of each voxel after scaling the image to [0, 1] by its own min/max."""
    lo, hi = image.min(), image.max()
    scaled = (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)
    return (scaled * bins).long().clamp_(max=bins - 1)


def _entropy(p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Shannon entropy (nats) of the distributions ``p`` summed over ``dims``; 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(dims)


def foreground(image: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """The voxels of ``image`` ``[X, Y, Z]`` above ``fraction`` of its 99th percentile (the head, not the air around
    it), as a bool tensor of its shape."""
    return image > fraction * percentiles(image.flatten()[::7], [99.0])[0].item()


def normalized_mutual_information(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    bins: int = 32,
    mask: torch.Tensor | np.ndarray | None = None,
) -> float:
    """NMI = 2 MI / (H(a) + H(b)) of two images ``[X, Y, Z]`` over ``mask`` (default: everywhere): 1 when one image
    determines the other, 0 when they are independent. Each image is scaled to [0, 1] by its min/max inside the
    region and quantised into ``bins`` levels."""
    ta = _volume(a).float()
    tb = _volume(b, ta.device).float()
    if ta.shape != tb.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(ta.shape)} and {tuple(tb.shape)}.")
    region = torch.ones_like(ta, dtype=torch.bool) if mask is None else _volume(mask, ta.device).bool()
    va, vb = ta[region], tb[region]
    if va.numel() == 0:
        return float("nan")
    joint = torch.bincount(_bin_indices(va, bins) * bins + _bin_indices(vb, bins), minlength=bins * bins)
    p = joint.view(bins, bins).double() / va.numel()
    h_a, h_b = _entropy(p.sum(1), (0,)), _entropy(p.sum(0), (0,))
    return float(2.0 * (h_a + h_b - _entropy(p, (0, 1))) / (h_a + h_b)) if h_a + h_b > 0 else float("nan")


def patchwise_mi_map(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    patch: int = 16,
    stride: int = 4,
    bins: int = 16,
    mask: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, float]:
    """Normalised mutual information of ``a`` and ``b`` in every cubic patch (patch-wise MI map, PMM).

    Both images are scaled to [0, 1] by their own min/max and quantised by hard binning into ``bins`` levels. In each
    patch NMI = 2 MI / (H(a) + H(b)) (symmetric uncertainty): 1 when one image determines the other, 0 when they are
    independent, NaN when both are constant in the patch. The joint histograms of all patches are obtained at once:
    one histogram per ``stride``-sized block, then a box sum over ``patch // stride`` blocks along each axis.

    Args:
        a: image [X, Y, Z] (leading singleton dims are accepted).
        b: image on the same grid.
        patch: patch edge length in voxels; a multiple of ``stride``.
        stride: step between patch origins in voxels.
        bins: histogram bins per image.
        mask: optional region [X, Y, Z]; a patch is kept when its centre voxel is in the mask.

    Returns:
        The map [Px, Py, Pz] (float32, NaN for dropped or undefined patches), where entry (i, j, k) is the patch with
        origin voxel (i, j, k) * stride, and the mean of its finite entries (NaN when there are none).
    """
    ta = _volume(a).float()
    tb = _volume(b, ta.device).float()
    if ta.ndim != 3 or ta.shape != tb.shape:
        raise ValueError(f"a and b must be 3D images of one shape, got {tuple(ta.shape)} and {tuple(tb.shape)}.")
    if patch % stride != 0:
        raise ValueError(f"patch ({patch}) must be a multiple of stride ({stride}).")
    if min(ta.shape) < patch:
        raise ValueError(f"image shape {tuple(ta.shape)} is smaller than the patch size {patch}.")
    n_patch = [(s - patch) // stride + 1 for s in ta.shape]
    n_block = [n + patch // stride - 1 for n in n_patch]
    crop = tuple(slice(0, n * stride) for n in n_block)

    joint = _bin_indices(ta[crop], bins) * bins + _bin_indices(tb[crop], bins)
    # block id of every voxel in the cropped region, then one bincount for all (joint bin, block) pairs
    block = [torch.arange(n * stride, device=ta.device) // stride for n in n_block]
    block_id = (block[0].view(-1, 1, 1) * n_block[1] + block[1].view(1, -1, 1)) * n_block[2] + block[2].view(1, 1, -1)
    n_blocks = n_block[0] * n_block[1] * n_block[2]
    hist = torch.bincount((joint * n_blocks + block_id).flatten(), minlength=bins * bins * n_blocks)
    hist = hist.view(bins * bins, *n_block).float()
    for axis in (1, 2, 3):
        hist = hist.unfold(axis, patch // stride, 1).sum(-1)
    p = hist.view(bins, bins, *n_patch).double() / patch**3

    h_a, h_b, h_ab = _entropy(p.sum(1), (0,)), _entropy(p.sum(0), (0,)), _entropy(p, (0, 1))
    nmi = (2.0 * (h_a + h_b - h_ab) / (h_a + h_b)).float()  # 0 / 0 -> NaN for patches constant in both images
    if mask is not None:
        m = _volume(mask, ta.device).bool()
        if m.shape != ta.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} does not match image shape {tuple(ta.shape)}.")
        centre = tuple(slice(patch // 2, patch // 2 + (n - 1) * stride + 1, stride) for n in n_patch)
        nmi = torch.where(m[centre], nmi, torch.nan)
    finite = nmi[torch.isfinite(nmi)]
    return nmi, float(finite.mean()) if finite.numel() else float("nan")
