"""Folding measures of a transform: non-positive Jacobian determinants and non-diffeomorphic volume."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from monai.utils import convert_to_tensor

__all__ = ["ndv_percent", "nonpositive_jacobian_percent"]

# Cube corners (offsets along the three array axes) and the ten tetrahedra of the two five-tetrahedra splits of a
# voxel cube: each split is one central tetrahedron on four corners of equal parity plus the four corner tetrahedra
# cut off at the other four corners. Together the two splits cover the cube twice.
_CORNERS = list(itertools.product((0, 1), repeat=3))
_EVEN = [c for c in _CORNERS if sum(c) % 2 == 0]
_ODD = [c for c in _CORNERS if sum(c) % 2 == 1]


def _corner_tetrahedron(apex: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The apex and its three cube neighbours."""
    return [apex] + [tuple(1 - v if a == axis else v for a, v in enumerate(apex)) for axis in range(3)]


_TETRAHEDRA = [_EVEN, _ODD] + [_corner_tetrahedron(c) for c in _CORNERS]


def _reference_orientation(tet: list[tuple[int, ...]]) -> float:
    """Sign of the undeformed signed volume, so that the identity map gives positive volumes for every tetrahedron."""
    v = np.array(tet, dtype=float)
    return float(np.sign(np.linalg.det((v[1:] - v[0]).T)))


_ORIENTATION = [_reference_orientation(t) for t in _TETRAHEDRA]


def _spatial(x: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """Plain tensor with leading singleton (batch/channel) dims removed."""
    t = convert_to_tensor(x, track_meta=False, device=device)
    while t.ndim > 3 and t.shape[0] == 1:
        t = t[0]
    return t


def _as_mask(mask: torch.Tensor | np.ndarray | None, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    m = _spatial(mask, device).bool()
    if m.shape != shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match {tuple(shape)}.")
    return m


def nonpositive_jacobian_percent(
    det: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None
) -> float:
    """Percentage of voxels whose Jacobian determinant is <= 0.

    Args:
        det: Jacobian determinant map [X, Y, Z] (any leading singleton dims are accepted).
        mask: optional region [X, Y, Z]; only its non-zero voxels are counted.

    Returns:
        100 * #(det <= 0) / #voxels, over the mask when given (NaN for an empty mask).
    """
    d = _spatial(det)
    m = _as_mask(mask, d.shape, d.device)
    bad = d <= 0
    if m is None:
        return 100.0 * float(bad.sum()) / bad.numel()
    total = int(m.sum())
    return 100.0 * float((bad & m).sum()) / total if total else float("nan")


def _det3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Determinant of the 3x3 matrices with columns a, b, c, each [3, ...]."""
    return a[0] * (b[1] * c[2] - b[2] * c[1]) + a[1] * (b[2] * c[0] - b[0] * c[2]) + a[2] * (b[0] * c[1] - b[1] * c[0])


def _inverted_volume(u: torch.Tensor) -> torch.Tensor:
    """Volume of the inverted tetrahedra of each cube, summed over both splits, [X-1, Y-1, Z-1] in voxel units.

    Args:
        u: displacement [3, X, Y, Z] in voxel units.
    """
    shape = u.shape[1:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=u.dtype, device=u.device) for s in shape], indexing="ij"))
    phi = grid + u
    nx, ny, nz = (s - 1 for s in shape)
    corner = {c: phi[:, c[0] : c[0] + nx, c[1] : c[1] + ny, c[2] : c[2] + nz] for c in _CORNERS}
    inverted = torch.zeros(nx, ny, nz, dtype=u.dtype, device=u.device)
    for tet, sign in zip(_TETRAHEDRA, _ORIENTATION):
        origin = corner[tet[0]]
        volume = _det3(*(corner[v] - origin for v in tet[1:]))
        inverted += volume.mul_(-sign / 6.0).clamp_(min=0)
    return inverted


def ndv_percent(
    ddf_vox: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None, slab: int = 16
) -> float:
    """Non-diffeomorphic volume (NDV) of the map x -> x + u(x), in % of the evaluated volume.

    Each cube spanned by 2x2x2 neighbouring voxel centres is cut into tetrahedra by both of its five-tetrahedra
    splits; the map is linear on each tetrahedron, so a tetrahedron with negative signed volume after mapping is a
    fold. NDV is the total volume of those inverted tetrahedra, halved because the two splits cover each cube twice,
    divided by the undeformed volume of the cubes (Liu et al., "On finite difference Jacobian computation in
    deformable image registration", IJCV 2024). Volumes are measured in voxel units, so the ratio does not depend on
    the spacing.

    Args:
        ddf_vox: displacement [3, X, Y, Z] in voxel units of the grid (channel c along array axis c).
        mask: optional region [X, Y, Z]; a cube is evaluated when its lowest corner voxel is in the mask.
        slab: number of cube layers along the first axis processed at once (bounds the temporary memory).

    Returns:
        NDV in percent (NaN when no cube is evaluated).
    """
    u = _spatial(ddf_vox)
    if u.ndim != 4 or u.shape[0] != 3:
        raise ValueError(f"ddf_vox must have shape [3, X, Y, Z], got {tuple(u.shape)}.")
    if min(u.shape[1:]) < 2:
        raise ValueError(f"ndv_percent needs at least 2 voxels along each axis, got {tuple(u.shape[1:])}.")
    u = u.to(torch.float64 if u.dtype == torch.float64 else torch.float32)
    m = _as_mask(mask, u.shape[1:], u.device)
    nx, ny, nz = (s - 1 for s in u.shape[1:])
    cubes = torch.ones(nx, ny, nz, dtype=torch.bool, device=u.device) if m is None else m[:nx, :ny, :nz]
    total = int(cubes.sum())
    if total == 0:
        return float("nan")
    inverted = sum(
        float((_inverted_volume(u[:, x0 : x0 + slab + 1]) * cubes[x0 : x0 + slab]).sum()) for x0 in range(0, nx, slab)
    )
    return 100.0 * inverted / (2.0 * total)
