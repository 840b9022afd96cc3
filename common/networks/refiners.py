"""Progressive refinement of a registration field: small U-Nets at coarse-to-fine resolutions, each predicting a
residual field composed onto the field so far (optimised per pair, the backbone that gave the first field frozen)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import UNet

from common.spatial.fields import resize_ddf, warp

__all__ = ["ProgressiveRefiner"]


class ProgressiveRefiner(nn.Module):
    """Refine a displacement ``ddf`` ``[B, 3, X, Y, Z]`` (voxels, pull-back) of ``moving`` onto ``fixed``
    (``[B, 1, X, Y, Z]``) by one U-Net per scale, coarse to fine.

    At each scale the U-Net sees (moving warped by the field so far, fixed) downsampled by ``scales[i]``, and predicts a
    residual ``r`` there; ``r`` is resampled to full resolution and composed after the field so far:
    ``ddf <- r + ddf(x + r)`` (the moving image is then read at ``phi(x + r(x))``). The finest residual is scaled by
    ``final_scale``. Each U-Net's output layer starts at N(0, 1e-5) with a zero bias (the paper does not say; as
    VoxelMorph's flow layer), so that an untrained refiner returns the field it is given, not one of several voxels.

    Args:
        scales: downsampling factor of each stage, coarse to fine (e.g. ``(4, 2, 1)``).
        channels: the U-Nets' channels per level (``(32, 64, 128)``: base 32, depth 3).
        final_scale: factor of the finest stage's residual (0.05).
    """

    def __init__(
        self, scales: Sequence[int] = (4, 2, 1), channels: Sequence[int] = (32, 64, 128), final_scale: float = 0.05
    ) -> None:
        super().__init__()
        if not scales or min(scales) < 1 or list(scales) != sorted(scales, reverse=True):
            raise ValueError(f"scales must be positive downsampling factors, coarse to fine, got {list(scales)}.")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {list(channels)}.")
        self.scales, self.final_scale = [int(s) for s in scales], float(final_scale)
        self.stages = nn.ModuleList(
            UNet(3, 2, 3, channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=0)
            for _ in self.scales
        )
        for unet in self.stages:
            output = [m for m in unet.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))][-1]
            nn.init.normal_(output.weight, std=1e-5)
            nn.init.zeros_(output.bias)
        self.multiple = max(self.scales) * 2 ** (len(channels) - 1)

    def forward(
        self, fixed: torch.Tensor, moving: torch.Tensor, ddf: torch.Tensor | None, stages: int | None = None
    ) -> list[torch.Tensor]:
        """The field after each stage, coarse to fine (the last is the refined field), each ``[B, 3, X, Y, Z]``.

        ``ddf`` None: the identity (the first stage then neither warps nor composes, the same result at less cost).
        ``stages``: run only the first (coarsest) stages; the last of them is then the finest and its residual is the
        one scaled by ``final_scale``. None: all."""
        stages = len(self.scales) if stages is None else stages
        if not 1 <= stages <= len(self.scales):
            raise ValueError(f"stages must be between 1 and {len(self.scales)}, got {stages}.")
        shape = tuple(fixed.shape[2:])
        if any(s % self.multiple for s in shape):
            raise ValueError(f"image sides {shape} must be multiples of {self.multiple}.")
        fields = []
        for i, (scale, unet) in enumerate(zip(self.scales[:stages], self.stages)):
            coarse = [s // scale for s in shape]
            pair = torch.cat([moving if ddf is None else warp(moving, ddf), fixed], dim=1)
            if scale > 1:
                pair = nn.functional.interpolate(pair, size=coarse, mode="trilinear", align_corners=True)
            residual = resize_ddf(unet(pair), shape)
            if i == stages - 1:
                residual = residual * self.final_scale
            ddf = residual if ddf is None else residual + warp(ddf, residual)
            fields.append(ddf)
        return fields
