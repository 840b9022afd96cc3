"""The velocity network of the Neural ODE: a small CNN-MLP that outputs a dense velocity field.

It follows NODEO (Wu et al., CVPR 2022): strided 3x3x3 convolutions read a coordinate grid, a two-layer MLP with a
narrow hidden layer outputs the field at a quarter of the grid's resolution, and two trilinear x2 upsamplings bring it
back (the number of upsamplings is a parameter here). NODEO hard-codes the MLP width for one image size; here every size is derived from ``shape``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.spatial.grids import identity_grid


class VelocityNet(nn.Module):
    """Map a coordinate grid ``[B, 3, *shape]`` to a velocity field ``[B, 3, *shape]`` (voxels per unit time).

    The MLP's output is read in normalised coordinates (the grid spans [-1, 1] on every axis, as the input does), so
    the optimiser's step size means the same fraction of the field of view whatever the grid size.

    Args:
        shape: spatial shape of the flow grid.
        channels: width of the convolutions.
        num_convs: number of stride-2 convolutions (the first maps 3 -> ``channels``).
        hidden: width of the MLP's hidden layer.
        upsample_steps: number of trilinear x2 upsamplings after the MLP (NODEO: 2); the MLP outputs the field at
            ``shape / 2**upsample_steps``.
        smoother: optional module applied to the field at the MLP's output resolution (e.g. an RKHS smoother).

    The last linear layer starts at zero, so an untrained network gives the identity transform.
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int = 32,
        num_convs: int = 5,
        hidden: int = 16,
        upsample_steps: int = 2,
        smoother: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [nn.Conv3d(3 if i == 0 else channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*layers)
        encoded = [s for s in self.shape]
        for _ in range(num_convs):
            encoded = [math.floor((s - 1) / 2) + 1 for s in encoded]
        self.upsample_steps = upsample_steps
        self.coarse_shape = tuple(math.ceil(s / 2**upsample_steps) for s in self.shape)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * math.prod(encoded), hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 3 * math.prod(self.coarse_shape)),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.smoother = smoother
        self.register_buffer("grid", self._normalised_grid(), persistent=False)

    def _normalised_grid(self) -> torch.Tensor:
        grid = identity_grid(self.shape)
        scale = torch.tensor([max(s - 1, 1) for s in self.shape], dtype=grid.dtype).view(3, 1, 1, 1)
        return (2 * grid / scale - 1).unsqueeze(0)

    def shape_independent_state(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, which do not depend on ``shape`` (what ``models/`` ships)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("encoder.")}

    def forward(self, grid: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for ``grid`` ``[B, 3, *shape]`` in [-1, 1] coordinates; the identity grid when omitted."""
        x = self.grid if grid is None else grid
        coarse = self.mlp(self.encoder(x)).view(x.shape[0], 3, *self.coarse_shape)
        if self.smoother is not None:
            coarse = self.smoother(coarse)
        v = coarse
        for k in range(self.upsample_steps - 1, -1, -1):
            size = tuple(math.ceil(s / 2**k) for s in self.shape)
            v = F.interpolate(v, size=size, mode="trilinear", align_corners=True)
        # the MLP speaks normalised [-1, 1] coordinates, like its input: convert to voxels of the output grid
        scale = torch.tensor([(s - 1) / 2 for s in self.shape], dtype=v.dtype, device=v.device)
        return v * scale.view(1, 3, 1, 1, 1)
