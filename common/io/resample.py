"""Resampling an image onto another grid through both headers, optionally through a displacement field."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.config import NdarrayOrTensor
from monai.utils import convert_to_tensor

from common.spatial import grid_sample


def _affine(affine: NdarrayOrTensor) -> torch.Tensor:
    return convert_to_tensor(affine, dtype=torch.float64, device=torch.device("cpu"), track_meta=False)


def resample_to_grid(
    image: torch.Tensor,
    src_affine: NdarrayOrTensor,
    dst_affine: NdarrayOrTensor,
    dst_shape: Sequence[int],
    ddf: torch.Tensor | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Sample ``image`` once at ``A_src^-1 A_dst (x + ddf(x))`` for every voxel ``x`` of the destination grid.

    Edges follow ITK's ``WarpImageFilter`` with a linear (or nearest) interpolator: a point whose continuous
    index lies outside ``[-0.5, N - 0.5)`` on any axis of ``image`` gives 0, one inside takes the nearest edge
    values where its neighbours fall off the grid. Applying the same displacement, written by
    :func:`common.io.writers.save_ddf_itk`, with ITK's own resampler therefore gives the same image.

    Args:
        image: ``[C, X', Y', Z']`` on the source grid; any dtype, computation follows its device.
        src_affine: ``4x4`` voxel-to-world of ``image`` (RAS mm), array or tensor.
        dst_affine: ``4x4`` voxel-to-world of the destination grid, in the same world space.
        dst_shape: destination spatial shape ``(X, Y, Z)``.
        ddf: ``[3, X, Y, Z]`` displacement in voxels of the destination grid, or None for the identity.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"`` (label maps).

    Returns:
        ``[C, X, Y, Z]`` plain tensor of ``image``'s dtype (integer images are rounded back to their type).
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")
    data = image.as_tensor() if hasattr(image, "as_tensor") else image
    device = data.device
    # float64 keeps every int32 label value exact; float32 images stay in float32.
    work = torch.float32 if data.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64
    index_map = torch.linalg.inv(_affine(src_affine)) @ _affine(dst_affine)
    index_map = index_map.to(device=device, dtype=work)

    axes = [torch.arange(int(n), dtype=work, device=device) for n in dst_shape]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    if ddf is not None:
        points = points + convert_to_tensor(ddf, dtype=work, device=device, track_meta=False)
    index = torch.einsum("ij,j...->i...", index_map[:3, :3], points) + index_map[:3, 3].view(3, 1, 1, 1)

    size = torch.tensor(data.shape[1:], dtype=work, device=device).view(3, 1, 1, 1)
    normalized = 2.0 * index / (size - 1.0).clamp(min=1.0) - 1.0
    # grid_sample reads the last grid component as the last array axis
    grid = normalized.flip(0).permute(1, 2, 3, 0).unsqueeze(0)
    out = grid_sample(data.unsqueeze(0).to(work), grid, mode=mode)[0]
    inside = ((index >= -0.5) & (index < size - 0.5)).all(0)
    out = out * inside
    if not data.is_floating_point():
        out = out.round()
    return out.to(data.dtype)
