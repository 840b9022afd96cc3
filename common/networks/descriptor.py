"""A dense, contrast-invariant descriptor learned by contrastive training: a small U-Net and self-similarity tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from common.losses.mind import mind_ssc

__all__ = ["DescriptorUNet", "SelfSimilarityDescriptor"]


def _block(in_channels: int, out_channels: int, strides: int = 1) -> Convolution:
    return Convolution(
        3,
        in_channels,
        out_channels,
        strides=strides,
        kernel_size=3,
        act=("leakyrelu", {"negative_slope": 0.2}),
        norm="instance",
    )


class DescriptorUNet(nn.Module):
    """Encoder-decoder CNN ``[B, 1, X, Y, Z] -> [B, out_channels, X, Y, Z]`` with skip connections.

    Two initial convolution blocks at full resolution, three stride-2 levels down and three trilinear levels up,
    each joined to the encoder feature of its resolution, and two final blocks (the last a plain convolution).
    Any spatial size works: each upsampling goes to the size of its skip connection.

    Args:
        channels: feature widths of the full-resolution level and the three coarser levels.
        out_channels: width of the output feature map.
    """

    def __init__(self, channels: Sequence[int] = (8, 16, 16, 32), out_channels: int = 8) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels gives the full-resolution and three coarser widths, got {list(channels)}.")
        c = list(channels)
        self.initial = nn.Sequential(_block(1, c[0]), _block(c[0], c[0]))
        self.down = nn.ModuleList(
            [nn.Sequential(_block(c[i], c[i + 1], strides=2), _block(c[i + 1], c[i + 1])) for i in range(3)]
        )
        self.up = nn.ModuleList([_block(c[i + 1] + c[i], c[i]) for i in range(2, -1, -1)])
        self.final = nn.Sequential(_block(c[0], c[0]), nn.Conv3d(c[0], out_channels, kernel_size=3, padding=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # PyTorch sends a CPU convolution of a single image with at most 20480 values in its first four dims to a
        # native kernel 10-20x slower than oneDNN, which it uses for any batch of two; instance norm keeps samples
        # independent, so describing a small image next to a copy of itself only saves time
        width = self.initial[0].conv.out_channels
        single = image.device.type == "cpu" and image.shape[0] == 1 and width * math.prod(image.shape[2:4]) <= 20480
        if single:
            image = image.repeat(2, 1, 1, 1, 1)
        skips = [self.initial(image)]
        for level in self.down:
            skips.append(level(skips[-1]))
        x = skips.pop()
        for level in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = level(torch.cat([x, skip], dim=1))
        x = self.final(x)
        return x[:1] if single else x


class SelfSimilarityDescriptor(nn.Module):
    """Self-similarity tokens of a learned feature map at several dilations, stacked and L2-normalised per voxel.

    ``features(image)`` is compared with itself as MIND-SSC compares intensities (:func:`common.losses.mind_ssc`
    on a multi-channel map): 12 channels per dilation, 24 with the default two dilations.

    Args:
        features: network ``[B, 1, *S] -> [B, F, *S]``, e.g. :class:`DescriptorUNet`.
        dilations: neighbourhood distances of the self-similarity tokens (voxels).
        radius: half width of the patch over which feature distances are averaged.
    """

    def __init__(self, features: nn.Module, dilations: Sequence[int] = (1, 2), radius: int = 1) -> None:
        super().__init__()
        self.features, self.dilations, self.radius = features, tuple(int(d) for d in dilations), radius

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 1, *S]`` -> ``[B, 12 * len(dilations), *S]``, unit norm at every voxel."""
        f = self.features(image)
        tokens = torch.cat([mind_ssc(f, self.radius, d) for d in self.dilations], dim=1)
        if torch.jit.is_tracing() or not torch.is_grad_enabled():
            # plain operations, which TorchScript can record (the zoo's export traces this)
            return _unit_vectors(tokens)[0]
        return _UnitNorm.apply(tokens)


def _unit_vectors(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, *S]`` -> its unit vectors over the channels and the reciprocal norms ``[B, 1, *S]``; the tokens are
    positive, so the norm's floor only guards the dtype."""
    rnorm = torch.linalg.vecdot(tokens, tokens, dim=1).unsqueeze(1).clamp_min(1e-24).rsqrt()
    return tokens * rnorm, rnorm


class _UnitNorm(torch.autograd.Function):
    """``[B, C, *S]`` divided by its L2 norm over the channels at every voxel, with the backward written out.

    ``F.normalize``, or the same by autograd's chain of square, sum, reciprocal square root and product, allocates a
    ``C``-channel tensor per step forward and backward; this keeps the unit vectors and the reciprocal norms and
    takes about two thirds of the time on the CPU.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        unit, rnorm = _unit_vectors(tokens)
        ctx.save_for_backward(unit, rnorm)
        return unit

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        unit, rnorm = ctx.saved_tensors
        # the gradient's component along the unit vector removed, scaled by the reciprocal norm
        along = torch.linalg.vecdot(grad, unit, dim=1).unsqueeze(1)
        return torch.addcmul(grad, unit, along, value=-1.0).mul_(rnorm)
