"""Target registration error of corresponding landmarks under a dense displacement field."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import convert_to_tensor

__all__ = ["tre"]


def _sample_ddf(ddf_vox: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of ``ddf_vox`` [3, X, Y, Z] at continuous voxel indices ``idx`` [N, 3] -> [N, 3].

    Points outside the grid take the value at the nearest border voxel.
    """
    size = torch.tensor(ddf_vox.shape[1:], dtype=idx.dtype, device=idx.device)
    # align_corners=True maps index 0 -> -1 and index size-1 -> +1; grid_sample wants the last axis first
    norm = 2.0 * idx / (size - 1).clamp(min=1) - 1.0
    grid = norm.flip(-1).view(1, -1, 1, 1, 3).to(ddf_vox.dtype)
    sampled = F.grid_sample(ddf_vox[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return sampled.view(3, -1).T


def tre(
    fixed_pts_ras: torch.Tensor | np.ndarray,
    moving_pts_ras: torch.Tensor | np.ndarray,
    ddf_vox: torch.Tensor | np.ndarray,
    fixed_affine: torch.Tensor | np.ndarray,
    fixed_to_moving: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Target registration error of each landmark pair, in mm.

    A fixed point x (voxel index i = A^-1 x) maps to A (i + u(i)) = x + A[:3, :3] u(i) in moving world space, with u
    interpolated trilinearly; TRE is the distance from there to the corresponding moving point. A zero ``ddf_vox``
    gives the error before registration.

    Args:
        fixed_pts_ras: [N, 3] fixed landmarks, RAS world mm.
        moving_pts_ras: [N, 3] corresponding moving landmarks, RAS world mm.
        ddf_vox: displacement [3, X, Y, Z] in voxel units of the fixed grid (channel c along array axis c).
        fixed_affine: [4, 4] voxel -> RAS world affine of the fixed grid.
        fixed_to_moving: [4, 4] world map applied after the displacement (an affine pre-alignment), or None.

    Returns:
        [N] float64 errors in mm, on the device of ``ddf_vox``.
    """
    u = convert_to_tensor(ddf_vox, track_meta=False)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.ndim != 4 or u.shape[0] != 3:
        raise ValueError(f"ddf_vox must have shape [3, X, Y, Z], got {tuple(u.shape)}.")
    as64 = {"track_meta": False, "dtype": torch.float64, "device": u.device}
    fixed = convert_to_tensor(fixed_pts_ras, **as64).reshape(-1, 3)
    moving = convert_to_tensor(moving_pts_ras, **as64).reshape(-1, 3)
    affine = convert_to_tensor(fixed_affine, **as64)
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed and moving landmarks differ in number: {fixed.shape[0]} vs {moving.shape[0]}.")
    idx = (torch.linalg.inv(affine) @ F.pad(fixed, (0, 1), value=1.0).T).T[:, :3]
    disp = _sample_ddf(u, idx).to(torch.float64)
    mapped = fixed + disp @ affine[:3, :3].T
    if fixed_to_moving is not None:
        outer = convert_to_tensor(fixed_to_moving, **as64)
        mapped = mapped @ outer[:3, :3].T + outer[:3, 3]
    return torch.linalg.norm(mapped - moving, dim=1)
