"""Random voxels and blocks of a grid, and values of a warped volume at chosen voxels (stochastic losses)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .grids import grid_sample, identity_grid

__all__ = [
    "block_points",
    "mask_tiles",
    "random_blocks",
    "random_blocks_in",
    "random_voxels",
    "random_voxels_in",
    "sample_at",
    "warp_at",
]


def sample_at(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``volume`` ``[1, C, X, Y, Z]`` at ``points`` ``[N, 3]`` (normalised to ``[-1, 1]``
    corner to corner, in axis order; outside, the border's values) -> ``[1, C, N]``."""
    grid = points.flip(-1).view(1, -1, 1, 1, 3)  # grid_sample reads (z, y, x)
    return grid_sample(volume, grid).flatten(2)


def random_voxels(shape: Sequence[int], count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``count`` random voxel indices ``[count, 3]`` of a grid of ``shape``, in memory order, so that neighbouring
    samples read neighbouring voxels."""
    index = torch.randint(0, math.prod(shape), (count,), device=device).sort().values
    return _unravel(index, shape)


def _unravel(index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return torch.stack([index // (shape[1] * shape[2]), (index // shape[2]) % shape[1], index % shape[2]], dim=1)


def random_voxels_in(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` random voxel indices ``[count, 3]`` among the True voxels of ``mask`` ``[X, Y, Z]`` (drawn with
    replacement), in memory order."""
    inside = mask.flatten().nonzero()[:, 0]
    if len(inside) == 0:
        raise ValueError("the mask holds no voxel to sample.")
    index = inside[torch.randint(0, len(inside), (count,), device=mask.device)].sort().values
    return _unravel(index, mask.shape)


def random_blocks(
    shape: Sequence[int], block: Sequence[int], count: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """First corners ``[count, 3]`` of ``count`` random blocks of size ``block`` lying inside a grid of ``shape``."""
    room = torch.tensor(shape, device=device) - torch.tensor(block, device=device) + 1
    return (torch.rand(count, 3, device=device) * room).long()


def random_blocks_in(mask: torch.Tensor, block: Sequence[int], count: int) -> torch.Tensor:
    """First corners ``[count, 3]`` of ``count`` random blocks of size ``block`` inside the grid of ``mask``
    ``[X, Y, Z]``, each centred on a random True voxel of the mask where the grid's edges allow."""
    size = torch.tensor(block, device=mask.device)
    last = torch.tensor(mask.shape, device=mask.device) - size
    return torch.minimum((random_voxels_in(mask, count) - size // 2).clamp(min=0), last)


def mask_tiles(mask: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """First corners ``[count, 3]`` of the blocks of a regular tiling of ``mask``'s grid ``[X, Y, Z]`` by blocks of size
    ``block`` whose centre voxel is True."""
    starts = [torch.arange(0, n - b + 1, b, device=mask.device) for n, b in zip(mask.shape, block)]
    origins = torch.stack(torch.meshgrid(*starts, indexing="ij"), dim=-1).reshape(-1, 3)
    centres = origins + torch.tensor(block, device=mask.device) // 2
    return origins[mask[centres[:, 0], centres[:, 1], centres[:, 2]]]


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
