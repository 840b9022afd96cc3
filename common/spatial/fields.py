"""Dense displacement fields in voxel units: warping, composition, exponentiation, resizing, Jacobians.

A displacement field (ddf) is ``[B, 3, X, Y, Z]``; channel ``c`` is the displacement along array axis ``c`` in
voxels of the grid it lives on, and the transform it stands for maps ``x`` to ``x + u(x)`` (pull-back: the warped
image at ``x`` is the moving image at ``x + u(x)``), as in :class:`monai.networks.blocks.Warp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF

from .grids import grid_sample


def stage_fields(output: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A registration network's output as its fields, one per stage, coarse to fine (a single field: a list of one);
    the last is the result."""
    return list(output) if isinstance(output, (list, tuple)) else [output]


@lru_cache(maxsize=8)
def _normalised_identity(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Voxel centres of ``shape`` in ``grid_sample``'s corner-aligned [-1, 1] coordinates, array axis order:
    ``[1, *shape, len(shape)]``."""
    axes = [
        torch.linspace(-1, 1, n, device=device, dtype=dtype)
        if n > 1
        else torch.full((1,), -1.0, device=device, dtype=dtype)
        for n in shape
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None]


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Sample ``image`` ``[B, C, X, Y, Z]`` at ``x + ddf(x)``; ``ddf`` is ``[B, 3, X, Y, Z]`` in voxels.

    The same map as :class:`monai.networks.blocks.Warp` with its native ``grid_sample`` (a test holds them equal).
    It is the solver's inner loop, so the sampling grid is one multiply-add on a cached identity grid: ``Warp``
    normalises its grid in place and reverses its axes by fancy indexing, whose backward pass adds a scatter over the
    grid (about 1.4x the time forward and backward on the CPU), and it caches its identity grid by shape alone, so
    one layer cannot serve two devices.

    Args:
        image: ``[B, C, *S]``, floating point.
        ddf: ``[B, len(S), *S]``, displacement along array axis ``c`` in channel ``c`` (voxels).
        mode: ``grid_sample`` interpolation, ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``grid_sample`` padding outside the grid, ``"border"``, ``"zeros"`` or ``"reflection"``.
    """
    shape = tuple(ddf.shape[2:])
    if ddf.shape[:2] != (image.shape[0], len(shape)) or tuple(image.shape[2:]) != shape:
        raise ValueError(f"ddf {tuple(ddf.shape)} must be [B, {len(shape)}, *S] for the image {tuple(image.shape)}.")
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], dtype=ddf.dtype, device=ddf.device)
    grid = torch.addcmul(_normalised_identity(shape, ddf.device, ddf.dtype), torch.movedim(ddf, 1, -1), scale)
    # grid_sample reads its coordinates last axis first
    return grid_sample(image, grid.flip(-1), mode=mode, padding_mode=padding_mode)


def scaling_and_squaring(velocity: torch.Tensor, num_steps: int = 7) -> torch.Tensor:
    """Group exponential of a stationary velocity field ``[B, 3, X, Y, Z]`` (voxels) by scaling and squaring."""
    return DVF2DDF(num_steps=num_steps, padding_mode="border")(velocity)


def invert_ddf(ddf: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Inverse of the transform ``x -> x + ddf(x)`` as a displacement on the same grid, by the fixed-point iteration
    ``w = -ddf(x + w)`` (it converges where the transform is invertible with ``|grad ddf| < 1``, as smooth
    registration fields are).

    Args:
        ddf: ``[B, 3, X, Y, Z]`` displacement in voxels.
        iterations: fixed-point steps.

    Returns:
        ``w`` ``[B, 3, X, Y, Z]`` (voxels) with ``w(y) + ddf(y + w(y)) = 0``.
    """
    inverse = -ddf
    for _ in range(iterations):
        inverse = -warp(ddf, inverse)
    return inverse


def resize_ddf(ddf: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a displacement field onto a grid of another resolution covering the same field of view.

    Grids are matched corner to corner (``align_corners=True``), so a displacement of one voxel on an ``N``-point
    axis becomes ``(M - 1) / (N - 1)`` voxels on an ``M``-point axis.

    Args:
        ddf: ``[B, 3, *S]`` in voxels of the source grid.
        shape: target spatial shape ``(X, Y, Z)``.
    """
    src = ddf.shape[2:]
    if tuple(src) == tuple(shape):
        return ddf
    out = F.interpolate(ddf, size=tuple(shape), mode="trilinear", align_corners=True)
    scale = torch.tensor([(m - 1) / max(n - 1, 1) for n, m in zip(src, shape)], dtype=ddf.dtype, device=ddf.device)
    return out * scale.view(1, -1, *([1] * len(shape)))


def spatial_gradient(ddf: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``x + u(x)`` by central differences (one-sided at the border).

    Args:
        ddf: ``[B, 3, X, Y, Z]`` in voxels.

    Returns:
        ``[B, 3, 3, X, Y, Z]``: entry ``[:, i, j]`` is ``d(x_i + u_i) / d x_j``.
    """
    grads = torch.stack(torch.gradient(ddf, dim=(2, 3, 4)), dim=2)
    eye = torch.eye(3, dtype=ddf.dtype, device=ddf.device).view(1, 3, 3, 1, 1, 1)
    return grads + eye


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the transform's Jacobian, ``[B, 3, X, Y, Z]`` -> ``[B, 1, X, Y, Z]`` (unitless volume ratio).

    Computed in voxel coordinates, which gives the same value as in world coordinates because the transform maps the
    fixed grid onto itself.
    """
    j = spatial_gradient(ddf)
    det = (
        j[:, 0, 0] * (j[:, 1, 1] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 1])
        - j[:, 0, 1] * (j[:, 1, 0] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 0])
        + j[:, 0, 2] * (j[:, 1, 0] * j[:, 2, 1] - j[:, 1, 1] * j[:, 2, 0])
    )
    return det.unsqueeze(1)
