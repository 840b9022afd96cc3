"""Random voxels and blocks of a grid, and values of a warped volume at chosen voxels (stochastic losses)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .grids import identity_grid

__all__ = ["block_points", "random_blocks", "random_voxels", "sample_at", "warp_at"]


def sample_at(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``volume`` ``[1, C, X, Y, Z]`` at ``points`` ``[N, 3]`` (normalised to ``[-1, 1]``
    corner to corner, in axis order; outside, the border's values) -> ``[1, C, N]``."""
    grid = points.flip(-1).view(1, -1, 1, 1, 3)  # grid_sample reads (z, y, x)
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True).flatten(2)


def random_voxels(shape: Sequence[int], count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``count`` random voxel indices ``[count, 3]`` of a grid of ``shape``, in memory order, so that neighbouring
    samples read neighbouring voxels."""
    index = torch.randint(0, math.prod(shape), (count,), device=device).sort().values
    return torch.stack([index // (shape[1] * shape[2]), (index // shape[2]) % shape[1], index % shape[2]], dim=1)


def random_blocks(
    shape: Sequence[int], block: Sequence[int], count: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """First corners ``[count, 3]`` of ``count`` random blocks of size ``block`` lying inside a grid of ``shape``."""
    room = torch.tensor(shape, device=device) - torch.tensor(block, device=device) + 1
    return (torch.rand(count, 3, device=device) * room).long()


def block_points(origins: torch.Tensor, block: Sequence[int], margin: int = 0) -> torch.Tensor:
    """Voxel indices ``[count * prod(block + 2 margin), 3]`` of the blocks at ``origins`` ``[count, 3]`` grown by
    ``margin`` on each side, block after block, each in C order (as ``[count, *grown block]`` flattens)."""
    offsets = identity_grid([b + 2 * margin for b in block], device=origins.device, dtype=torch.long) - margin
    return (origins[:, None] + offsets.flatten(1).T[None]).reshape(-1, 3)


def warp_at(
    displacement: torch.Tensor, source: torch.Tensor, points: torch.Tensor, shape: Sequence[int]
) -> torch.Tensor:
    """``source`` ``[1, C, *shape]`` warped by ``displacement`` ``[1, 3, *flow grid]`` (voxels of the flow grid, which
    spans the same field of view corner to corner), at voxel ``points`` ``[N, 3]`` of the ``shape`` grid -> ``[1, C, N]``;
    outside the grid, the border's displacement and values."""
    scale = (torch.tensor(shape, device=points.device) - 1).clamp(min=1).to(displacement.dtype)
    normalised = 2 * points.to(displacement.dtype) / scale - 1
    flow_size = torch.tensor(displacement.shape[2:], device=points.device, dtype=displacement.dtype)
    u = sample_at(displacement, normalised) * (scale / (flow_size - 1).clamp(min=1)).view(1, 3, 1)
    moved = normalised.T[None] + 2 * u / scale.view(1, 3, 1)
    return sample_at(source, moved[0].T)
