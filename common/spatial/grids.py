"""Voxel grids shared by the registration code."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
