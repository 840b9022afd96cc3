"""A U-Net that predicts a dense displacement field from an image pair."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import VoxelMorphUNet

__all__ = ["DisplacementUNet"]


class DisplacementUNet(VoxelMorphUNet):
    """MONAI's VoxelMorph U-Net mapping a pair ``[B, 2, X, Y, Z]`` (moving, fixed) to a displacement ``[B, 3, X, Y, Z]``
    (voxels), LeakyReLU throughout, whose output convolution starts near zero (weights N(0, ``output_std``), bias 0, as
    VoxelMorph initialises its flow layer) so that an untrained network predicts almost the identity.

    Args:
        channels: per level, the down and up channels, in MONAI's pairs (e.g. ``(16, 32, 32, 32, 32, 64, 64, 64)``).
        unet_out_channels: channels at the U-Net's full-resolution output.
        final_conv_channels: the full-resolution convolutions before the 3-channel output.
        negative_slope: LeakyReLU slope.
        output_std: standard deviation of the output convolution's initial weights.
    """

    def __init__(
        self,
        channels: Sequence[int],
        unet_out_channels: int = 16,
        final_conv_channels: Sequence[int] = (16, 16, 16),
        negative_slope: float = 0.2,
        output_std: float = 1e-5,
    ) -> None:
        act = ("leakyrelu", {"negative_slope": negative_slope})
        super().__init__(
            spatial_dims=3,
            in_channels=2,
            unet_out_channels=unet_out_channels,
            channels=channels,
            final_conv_channels=final_conv_channels,
            act=act,
            final_conv_act=act,
        )
        output = self.net[-1].final_conv_out.conv
        torch.nn.init.normal_(output.weight, std=output_std)
        torch.nn.init.zeros_(output.bias)
