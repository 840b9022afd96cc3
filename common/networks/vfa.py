"""Vector field attention (VFA): a shared feature pyramid of both images and a coarse-to-fine decoder that picks, at
each level, where each fixed voxel's features sit among the 27 neighbours of the warped moving features.

The module names and shapes are those of the public VFA code (``encoder.*``, ``decoder.project.*``,
``decoder.beta``), so that its checkpoints load into :class:`VFA` at the official sizes (the defaults).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.spatial import grid_sample, identity_grid

__all__ = ["VFA", "VFAEncoder"]


class _DoubleConv(nn.Module):
    """Two (convolution 3x3x3 with bias, instance norm with affine, LeakyReLU 0.01) blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        return F.leaky_relu(self.norm2(self.conv2(x)), 0.01)


class _Upsample(nn.Module):
    """Trilinear x2 (corners aligned), then convolution 3x3x3, instance norm, LeakyReLU 0.01."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.InstanceNorm3d(out_channels, affine=True)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)
        return F.leaky_relu(self.norm(self.conv(x)), 0.01)


class VFAEncoder(nn.Module):
    """Feature pyramid of one image ``[B, 1, X, Y, Z]`` (sides multiples of ``2**downsamples``): a U-Net whose
    decoder levels are the features, finest first: ``downsamples + 1`` maps, level ``l`` at ``1 / 2**l`` resolution.

    Args:
        downsamples: poolings (4 in the official configuration).
        start_channels: channels of the input convolution (8).
        max_channels: cap of the channels per level (64).
    """

    def __init__(self, downsamples: int = 4, start_channels: int = 8, max_channels: int = 64) -> None:
        super().__init__()
        if downsamples < 1 or start_channels < 1 or max_channels < start_channels:
            raise ValueError(
                f"need downsamples >= 1 and 1 <= start_channels <= max_channels, got {downsamples}, "
                f"{start_channels}, {max_channels}."
            )
        widths = [min(start_channels * 2 ** (level + 1), max_channels) for level in range(downsamples)]
        self.in_norm = nn.InstanceNorm3d(1, affine=True)
        self.in_conv = nn.Conv3d(1, start_channels, 3, padding=1)
        inputs = [start_channels, *widths[:-1]]
        self.encoder_conv = nn.ModuleList(_DoubleConv(i, o) for i, o in zip(inputs, widths))
        self.bottleneck_conv = _DoubleConv(widths[-1], widths[-1])
        deeper = [*widths[1:], widths[-1]]  # the channels arriving from the level below each level
        self.upsampling = nn.ModuleList(_Upsample(d, w) for d, w in zip(deeper, widths))
        self.decoder_conv = nn.ModuleList(_DoubleConv(2 * w, w) for w in widths)
        self.channels = [*widths, widths[-1]]
        self.downsamples = downsamples

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = F.leaky_relu(self.in_conv(self.in_norm(image)), 0.01)
        skips = []
        for conv in self.encoder_conv:
            x = conv(x)
            skips.append(x)
            x = F.avg_pool3d(x, 2)
        x = self.bottleneck_conv(x)
        features = [x]
        for level in reversed(range(self.downsamples)):
            up = self.upsampling[level](x, skips[level].shape[2:])
            x = self.decoder_conv[level](torch.cat([up, skips[level]], dim=1))
            features.insert(0, x)
        return features


def _normalised(grid: torch.Tensor) -> torch.Tensor:
    """Absolute voxel coordinates ``[B, 3, *S]`` -> grid_sample's ``[B, *S, 3]`` (x, y, z reversed), corners aligned."""
    size = torch.tensor(grid.shape[2:], device=grid.device, dtype=grid.dtype).view(1, 3, *([1] * 3))
    scaled = 2 * grid / (size - 1).clamp(min=1) - 1
    return scaled.movedim(1, -1).flip(-1)


def _sample(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return grid_sample(volume, _normalised(grid))


class VFA(nn.Module):
    """Vector field attention registration network: ``(fixed, moving)`` ``[B, 1, X, Y, Z]`` -> displacement
    ``[B, 3, X, Y, Z]`` in voxels, pull-back (``warped(x) = moving(x + u(x))``), sides multiples of
    ``2**downsamples``.

    Both images go through one :class:`VFAEncoder`. From the coarsest level to the finest, the moving features are
    warped by the grid found so far (upsampled), each fixed voxel's projected features (the query) are compared by
    scaled dot product with the projected warped moving features at its 27 neighbours (the keys), and the softmax
    weights average the 27 unit offsets into a displacement, scaled by the learnable ``beta``; the grid found so far
    is composed after it.

    Args:
        downsamples, start_channels, max_channels: the encoder's (see :class:`VFAEncoder`).
        matching_channels: channels of the finest level's projection; each coarser level's doubles, capped at
            ``max_channels`` (8: 8, 16, 32, 64, 64 officially).
        initial_beta: the initial scale of each level's displacement (0.1).
    """

    def __init__(
        self,
        downsamples: int = 4,
        start_channels: int = 8,
        max_channels: int = 64,
        matching_channels: int = 8,
        initial_beta: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = VFAEncoder(downsamples, start_channels, max_channels)
        self.decoder = nn.Module()
        widths = self.encoder.channels
        keys = [min(matching_channels * 2**level, max_channels) for level in range(downsamples + 1)]
        self.decoder.project = nn.ModuleList(nn.Conv3d(w, k, 3, padding=1) for w, k in zip(widths, keys))
        self.decoder.beta = nn.Parameter(torch.tensor([float(initial_beta)]))
        self.register_buffer(
            "offsets", torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=3))), persistent=False
        )
        self.multiple = 2**downsamples

    def _attend(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Softmax-weighted unit offsets ``[B, 3, *S]`` of each query voxel among the 27 neighbours of ``key``."""
        channels, shape = key.shape[1], key.shape[2:]
        padded = F.pad(key, [1] * 6, mode="replicate")
        x, y, z = shape
        # one neighbour at a time: stacking the 27 shifted keys first would hold 27 copies of them
        scores = [
            (query * padded[:, :, 1 + a : 1 + a + x, 1 + b : 1 + b + y, 1 + c : 1 + c + z]).sum(1)
            for a, b, c in self.offsets.long().tolist()
        ]
        weights = torch.softmax(torch.stack(scores, dim=1) / channels**0.5, dim=1)  # [B, 27, *S]
        return torch.einsum("bn...,nk->bk...", weights, self.offsets.to(weights))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        if fixed.shape != moving.shape or any(s % self.multiple for s in fixed.shape[2:]):
            raise ValueError(
                f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} need one shape whose sides are "
                f"multiples of {self.multiple}."
            )
        fixed_features, moving_features = self.encoder(fixed), self.encoder(moving)
        grid = None
        for level in reversed(range(len(fixed_features))):
            f, m = fixed_features[level], moving_features[level]
            shape = f.shape[2:]
            identity = identity_grid(shape, device=f.device, dtype=f.dtype)[None].expand(f.shape[0], -1, -1, -1, -1)
            if grid is None:
                grid, warped = identity, m
            else:
                coarse = torch.tensor(grid.shape[2:], device=f.device, dtype=f.dtype)
                scale = (torch.tensor(shape, device=f.device, dtype=f.dtype) - 1) / (coarse - 1).clamp(min=1)
                grid = F.interpolate(grid, size=tuple(shape), mode="trilinear", align_corners=True)
                grid = grid * scale.view(1, 3, 1, 1, 1)
                warped = _sample(m, grid)
            project = self.decoder.project[level]
            local = identity + self.decoder.beta * self._attend(project(f), project(warped))
            grid = _sample(grid, local)  # the grid found so far, composed after this level's
        return grid - identity
