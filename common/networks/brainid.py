"""Brain-ID's feature U-Net and its T1-synthesis head: any contrast in, a T1-like image out.

The module names and shapes are those of the public Brain-ID code (``backbone.encoders.*``, ``backbone.decoders.*``,
``head.final_conv_image``), so that its checkpoints load into :class:`BrainIDSynthesizer` at the official size
(``f_maps=64``, five levels: 65.9 M parameters); a smaller one is the same class with fewer features.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BrainIDSynthesizer", "BrainIDUNet"]


class _SingleConv(nn.Sequential):
    """Group norm of the input (8 groups, as officially; 1 under 8 channels; a divisor of 8 for sizes the official
    network does not have), convolution 3x3x3 without bias, LeakyReLU 0.01."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        groups = 1 if in_channels < 8 else math.gcd(8, in_channels)
        self.add_module("groupnorm", nn.GroupNorm(groups, in_channels))
        self.add_module("conv", nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False))
        self.add_module("LeakyReLU", nn.LeakyReLU(0.01, inplace=True))


class _DoubleConv(nn.Sequential):
    """Two :class:`_SingleConv`; an encoder's first one goes to ``max(out // 2, in)`` channels."""

    def __init__(self, in_channels: int, out_channels: int, encoder: bool) -> None:
        super().__init__()
        middle = max(out_channels // 2, in_channels) if encoder else out_channels
        self.add_module("SingleConv1", _SingleConv(in_channels, middle))
        self.add_module("SingleConv2", _SingleConv(middle, out_channels))


class _Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, pool: bool) -> None:
        super().__init__()
        self.pooling = nn.MaxPool3d(2) if pool else None
        self.basic_module = _DoubleConv(in_channels, out_channels, encoder=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.basic_module(x if self.pooling is None else self.pooling(x))


class _Decoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.basic_module = _DoubleConv(in_channels, out_channels, encoder=False)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.basic_module(torch.cat([skip, x], dim=1))


class BrainIDUNet(nn.Module):
    """3D U-Net ``[B, in_channels, X, Y, Z]`` -> features ``[B, f_maps, X, Y, Z]`` (sides multiples of
    ``2**(levels - 1)``): ``levels`` encoders of ``f_maps * 2**l`` channels (max pooling between), decoders with
    nearest upsampling and skip concatenation.

    Args:
        in_channels: input channels (1).
        f_maps: channels of the first level (64 officially).
        levels: encoder levels (5 officially).
    """

    def __init__(self, in_channels: int = 1, f_maps: int = 64, levels: int = 5) -> None:
        super().__init__()
        if in_channels < 1 or f_maps < 1 or levels < 2:
            raise ValueError(f"need in_channels >= 1, f_maps >= 1, levels >= 2; got {in_channels}, {f_maps}, {levels}.")
        widths = [f_maps * 2**level for level in range(levels)]
        inputs = [in_channels, *widths[:-1]]
        self.encoders = nn.ModuleList(_Encoder(i, o, pool=n > 0) for n, (i, o) in enumerate(zip(inputs, widths)))
        self.decoders = nn.ModuleList(
            _Decoder(widths[level] + widths[level + 1], widths[level]) for level in reversed(range(levels - 1))
        )
        self.multiple = 2 ** (levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.insert(0, x)
        for decoder, skip in zip(self.decoders, skips[1:]):
            x = decoder(skip, x)
        return x


class BrainIDSynthesizer(nn.Module):
    """Brain-ID's backbone and T1 head: an image ``[B, 1, X, Y, Z]`` of any contrast, min-max scaled to ``[0, 1]``,
    -> a T1-like image ``[B, 1, X, Y, Z]`` (a 1x1x1 convolution of the features, no activation).

    Args:
        f_maps, levels: the backbone's (see :class:`BrainIDUNet`).
    """

    def __init__(self, f_maps: int = 64, levels: int = 5) -> None:
        super().__init__()
        self.backbone = BrainIDUNet(1, f_maps, levels)
        self.head = nn.Module()
        self.head.final_conv_image = nn.Conv3d(f_maps, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if any(s % self.backbone.multiple for s in image.shape[2:]):
            raise ValueError(f"image sides {tuple(image.shape[2:])} must be multiples of {self.backbone.multiple}.")
        return self.head.final_conv_image(self.backbone(image))
