"""Voxel-level contrastive learning of dense descriptors: sampled voxel pairs and the InfoNCE loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["VoxelInfoNCELoss", "sample_voxels", "voxel_similarities"]


def sample_voxels(
    shape: torch.Size | tuple[int, ...], count: int, mask: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """``count`` distinct flat voxel indices ``[B, count]`` of a ``[B, C, *S]`` map, drawn inside ``mask`` when given.

    Args:
        shape: shape of the descriptor map.
        count: voxels per batch item (capped by the number of candidate voxels).
        mask: optional ``[B, 1, *S]`` foreground; voxels outside it are never drawn.
    """
    batch, spatial = shape[0], shape[2:]
    weights = torch.ones(batch, int(torch.tensor(spatial).prod()), device=device)
    if mask is not None:
        weights = mask.reshape(batch, -1).to(weights)
    count = min(count, int((weights > 0).sum(1).min()))
    return torch.multinomial(weights, count, replacement=False)


def voxel_similarities(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[B, N, N]`` between the descriptors of ``a`` and ``b`` ``[B, C, *S]`` at ``index`` ``[B, N]``.

    Entry ``(i, j)`` compares voxel ``index[i]`` of ``a`` with voxel ``index[j]`` of ``b``; the diagonal holds the
    positive pairs (the same voxel seen in the two views).
    """
    pick = index.unsqueeze(1).expand(-1, a.shape[1], -1)
    fa = F.normalize(a.flatten(2).gather(2, pick), dim=1)
    fb = F.normalize(b.flatten(2).gather(2, pick), dim=1)
    return fa.transpose(1, 2) @ fb


class VoxelInfoNCELoss(_Loss):
    """Symmetric InfoNCE over sampled voxels of two descriptor maps of one image under two views.

    For ``N`` voxels drawn at random (inside an optional mask), the descriptor of voxel ``i`` in view ``a`` must pick
    voxel ``i`` in view ``b`` among all ``N`` (softmax of cosine similarities over ``temperature``), and vice versa.

    Args:
        temperature: softmax temperature (Mok et al. / the Neural ODE paper: 0.05).
        num_samples: voxels drawn per batch item and call.
    """

    def __init__(self, temperature: float = 0.05, num_samples: int = 1024) -> None:
        super().__init__()
        if temperature <= 0 or num_samples < 2:
            raise ValueError(f"need temperature > 0 and num_samples >= 2, got {temperature} and {num_samples}.")
        self.temperature, self.num_samples = temperature, num_samples

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``a``, ``b``: ``[B, C, *S]`` descriptors of the two views on one grid; ``mask``: ``[B, 1, *S]`` or None."""
        if a.shape != b.shape:
            raise ValueError(f"the two views must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
        index = sample_voxels(a.shape, self.num_samples, mask, device=a.device)
        logits = voxel_similarities(a, b, index) / self.temperature
        target = torch.arange(logits.shape[1], device=a.device).expand(logits.shape[0], -1)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.transpose(1, 2), target))
