"""Networks that predict a dense displacement field from an image pair."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers import gaussian_1d, separable_filtering
from monai.networks.nets import VoxelMorphUNet

__all__ = ["DisplacementUNet", "PairInput"]


class DisplacementUNet(VoxelMorphUNet):
    """MONAI's VoxelMorph U-Net mapping a pair ``[B, 2, X, Y, Z]`` (moving, fixed) to a displacement ``[B, 3, X, Y, Z]``
    (voxels), LeakyReLU throughout, whose output convolution starts near zero (weights N(0, ``output_std``), bias 0, as
    VoxelMorph initialises its flow layer) so that an untrained network predicts almost the identity.

    Every other convolution starts from He-normal weights for the LeakyReLU slope and zero biases (VoxelMorph's
    ``he_normal``). PyTorch's default initialisation keeps a third of that variance per layer, so through the dozen
    layers of this plain U-Net the input-dependent part of the last features shrinks about a hundredfold below the
    biases': an untrained network then predicts nearly the same field for every pair, and the layers that would
    compute pair-specific fields receive gradients a hundred times smaller, mostly below Adam's epsilon.

    Args:
        channels: per level, the down and up channels, in MONAI's pairs (e.g. ``(16, 32, 32, 32, 32, 64, 64, 64)``).
        unet_out_channels: channels at the U-Net's full-resolution output.
        final_conv_channels: the full-resolution convolutions before the 3-channel output.
        negative_slope: LeakyReLU slope.
        output_std: standard deviation of the output convolution's initial weights.
        norm: MONAI's normalisation of every convolution but the output one (e.g. ``"instance"``, which has no
            parameters, so the state dict stays VoxelMorph's); None for none, as in VoxelMorph.
        edge_sigma: if > 0, each input image is replaced by its gradient magnitude after a Gaussian of this standard
            deviation (voxels), divided by its mean over the volume: a contrast-agnostic view of the pair (tissue
            boundaries lie where they lie, whatever the tissues' intensities; an inverted or rescaled contrast gives
            the same view), parameter-free. 0 feeds the images as they are.
        descriptor: a parameter-free module mapping each image ``[B, 1, X, Y, Z]`` to ``descriptor_channels`` feature
            maps (e.g. :class:`~common.losses.MINDSSC`), fed instead of the images: the network sees the pair as
            ``[B, 2 * descriptor_channels, X, Y, Z]`` (moving's, then fixed's). It is applied without gradient, so
            the images' own gradients are not available through it. Exclusive with ``edge_sigma``.
        descriptor_channels: channels of ``descriptor``'s output.
    """

    def __init__(
        self,
        channels: Sequence[int],
        unet_out_channels: int = 16,
        final_conv_channels: Sequence[int] = (16, 16, 16),
        negative_slope: float = 0.2,
        output_std: float = 1e-5,
        norm: str | tuple | None = None,
        edge_sigma: float = 0.0,
        descriptor: nn.Module | None = None,
        descriptor_channels: int = 12,
    ) -> None:
        if edge_sigma < 0:
            raise ValueError(f"edge_sigma must be >= 0, got {edge_sigma}.")
        if descriptor is not None and edge_sigma > 0:
            raise ValueError("edge_sigma and descriptor are two input views: give one of them.")
        if descriptor_channels < 1:
            raise ValueError(f"descriptor_channels must be >= 1, got {descriptor_channels}.")
        act = ("leakyrelu", {"negative_slope": negative_slope})
        super().__init__(
            spatial_dims=3,
            in_channels=2 * descriptor_channels if descriptor is not None else 2,
            unet_out_channels=unet_out_channels,
            channels=channels,
            final_conv_channels=final_conv_channels,
            act=act,
            final_conv_act=act,
            norm=norm,
        )
        final = self.net[-1]
        final.final_conv_out = Convolution(3, final.final_conv_out.conv.in_channels, 3, conv_only=True)
        output = final.final_conv_out.conv
        for module in self.modules():
            if isinstance(module, torch.nn.Conv3d) and module is not output:
                torch.nn.init.kaiming_normal_(module.weight, a=negative_slope, nonlinearity="leaky_relu")
                torch.nn.init.zeros_(module.bias)
        torch.nn.init.normal_(output.weight, std=output_std)
        torch.nn.init.zeros_(output.bias)
        # a buffer, not a parameter nor a state-dict entry: the weights stay loadable whatever the input view
        self.register_buffer("edge_kernel", gaussian_1d(torch.tensor(edge_sigma)) if edge_sigma > 0 else None, False)
        self.descriptor = descriptor

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """Displacement ``[B, 3, X, Y, Z]`` (voxels) of a pair ``[B, 2, X, Y, Z]`` (moving, fixed)."""
        if self.descriptor is not None:
            with torch.no_grad():
                pair = torch.cat([self.descriptor(pair[:, i : i + 1]) for i in range(2)], dim=1)
        if self.edge_kernel is not None:
            smoothed = separable_filtering(pair, [self.edge_kernel.to(pair)] * 3, mode="replicate")
            magnitude = torch.stack(torch.gradient(smoothed, dim=(2, 3, 4))).pow(2).sum(0).sqrt()
            pair = magnitude / (magnitude.mean(dim=(2, 3, 4), keepdim=True) + 1e-6)
        return super().forward(pair)


class PairInput(nn.Module):
    """A two-image network ``(fixed, moving) -> ddf`` (such as :class:`~common.networks.VFA`) called the way the
    collection's training steps and engines call networks: with one pair ``[B, 2, X, Y, Z]`` (moving, fixed). The
    wrapped network keeps its own state-dict keys (save ``network``, not this module)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.network(pair[:, 1:], pair[:, :1])
