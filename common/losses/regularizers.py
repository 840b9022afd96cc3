"""Regularisers of displacement and velocity fields ``[B, 3, X, Y, Z]`` (voxel units) missing from MONAI."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.spatial.fields import jacobian_determinant, spatial_gradient


class JacobianBarrierLoss(nn.Module):
    """Penalty barrier on small or negative Jacobian determinants: ``mean(relu(epsilon - det J) ** 2)``.

    Zero wherever the transform keeps at least ``epsilon`` of the local volume, so it leaves plausible deformations
    alone and grows quadratically as a voxel approaches folding.

    Args:
        epsilon: smallest volume ratio that goes unpenalised.
    """

    inputs = ("ddf",)

    def __init__(self, epsilon: float = 0.5) -> None:
        super().__init__()
        self.epsilon = epsilon

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        return F.relu(self.epsilon - jacobian_determinant(ddf)).pow(2).mean()


class DisplacementSmoothnessLoss(nn.Module):
    """Mean squared forward difference of the displacement along each axis (a diffusion regulariser)."""

    inputs = ("ddf",)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        terms = [torch.diff(ddf, dim=d).pow(2).mean() for d in range(2, ddf.ndim)]
        return torch.stack(terms).sum()


class VelocityMagnitudeLoss(nn.Module):
    """Mean squared velocity, which favours short paths (a small-deformation prior)."""

    inputs = ("velocity",)

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        return velocity.pow(2).mean()


class DisplacementDivergenceLoss(nn.Module):
    """Mean squared divergence of the displacement, ``mean((div u)^2)``: penalises local volume change (expansion and
    compression alike) and so favours near-incompressible deformations (the TTO-KD paper's divergence term)."""

    inputs = ("ddf",)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        jacobian = spatial_gradient(ddf)  # d(x_i + u_i)/dx_j: its trace is 3 + div u
        return (jacobian.diagonal(dim1=1, dim2=2).sum(-1) - 3).pow(2).mean()
