"""Voxel grids shared by the registration code."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates of a grid.

    Args:
        shape: spatial shape ``(X, Y, Z)``.

    Returns:
        tensor ``[len(shape), *shape]``; channel ``c`` holds the index along axis ``c``.
    """
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def scaled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: float) -> tuple[int, ...]:
    """Shape of a grid covering the same field of view at ``target_spacing`` mm, never finer than ``shape``.

    Args:
        shape: spatial shape of the image grid.
        spacing: voxel size of the image grid in mm, one per axis.
        target_spacing: wanted voxel size in mm; values below the image spacing keep the image resolution.
    """
    return tuple(max(2, min(int(n), round(n * float(sp) / target_spacing))) for n, sp in zip(shape, spacing))


def grid_sample(
    volume: torch.Tensor,
    grid: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "border",
    align_corners: bool = True,
) -> torch.Tensor:
    """:func:`torch.nn.functional.grid_sample` of a volume ``[B, C, X, Y, Z]`` at ``grid`` ``[B, *S, 3]`` ->
    ``[B, C, *S]``, the same values, with every CPU thread at work on a single volume.

    PyTorch's CPU kernel for volumes spreads its work over the batch alone, so one volume (every registration) is
    sampled on one thread, forward and backward: at 2 threads a third of a Neural ODE iteration's time. Here the
    points of one volume are cut into as many batch items as threads, each reading the same volume (an expanded view,
    no copy).
    """
    chunks = torch.get_num_threads()
    count = math.prod(grid.shape[1:-1])
    if volume.device.type != "cpu" or volume.ndim != 5 or volume.shape[0] != 1 or chunks < 2 or count < 4096:
        return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    size = -(-count // chunks)
    points = F.pad(grid.reshape(1, count, 3), (0, 0, 0, size * chunks - count))
    out = F.grid_sample(
        volume.expand(chunks, *volume.shape[1:]),
        points.view(chunks, size, 1, 1, 3),
        mode=mode,
        padding_mode=padding_mode,
        align_corners=align_corners,
    )
    out = out.view(chunks, volume.shape[1], size).transpose(0, 1).reshape(1, volume.shape[1], chunks * size)
    return out[:, :, :count].view(1, volume.shape[1], *grid.shape[1:-1])
