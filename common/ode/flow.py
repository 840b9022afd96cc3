"""A diffeomorphic transform as the flow of a stationary velocity field given by a network (a Neural ODE)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from common.io import RegistrationOutputError, switch
from common.io.writers import atomic_write
from common.spatial.fields import warp

from .adjoint import odeint_adjoint
from .solvers import odeint
from .velocity import VelocityNet


def sample_velocity(displacement: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """Right-hand side of ``d phi / dt = v(phi)`` with ``phi = x + displacement``: ``v`` sampled at ``phi``."""
    return warp(velocity, displacement, padding_mode="border")


class NeuralODEFlow(nn.Module):
    """``phi_1`` solving ``d phi_t / dt = v(phi_t)``, ``phi_0 = id``, with ``v`` from a :class:`VelocityNet`.

    Args:
        shape: spatial shape of the flow grid.
        num_steps: solver steps on ``[0, 1]``.
        solver: ``"euler"``, ``"midpoint"`` or ``"rk4"``.
        adjoint: gradients by the adjoint method (constant memory) instead of back-propagation through the solver
            (a bool, or its text as the command line gives it).
        velocity_net: builds the network from ``shape``; defaults to :class:`VelocityNet`.
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_steps: int = 8,
        solver: str = "euler",
        adjoint: bool = True,
        velocity_net: Callable[..., nn.Module] = VelocityNet,
    ) -> None:
        super().__init__()
        self.velocity_net = velocity_net(shape=shape)
        self.num_steps, self.solver = num_steps, solver
        self.adjoint = switch(adjoint, "network_def#adjoint")
        self.register_buffer("velocity_offset", None, persistent=False)

    def integrate(self, velocity: torch.Tensor) -> torch.Tensor:
        """Displacement ``phi_1 - id`` ``[B, 3, *S]`` (voxels) of the flow of ``velocity`` ``[B, 3, *S]``."""
        y0 = torch.zeros_like(velocity)
        if self.adjoint:
            return odeint_adjoint(sample_velocity, y0, velocity, self.num_steps, self.solver)
        (y1,) = odeint(lambda s: (sample_velocity(s[0], velocity),), (y0,), self.num_steps, self.solver)
        return y1

    def velocity(self) -> torch.Tensor:
        """The stationary velocity ``[1, 3, *S]`` (voxels per unit time): the network's, plus the offset set by
        :meth:`start_from`."""
        velocity = self.velocity_net()
        return velocity if self.velocity_offset is None else velocity + self.velocity_offset

    @torch.no_grad()
    def start_from(self, displacement: torch.Tensor, iterations: int = 8) -> None:
        """Make the flow start at ``displacement`` ``[1, 3, *S]`` (voxels of the flow grid) instead of the identity:
        the velocity whose flow it is, found by the fixed-point iteration ``v <- v + (u - flow(v))`` from ``v = u``,
        becomes a constant offset added to the network's velocity, which the optimisation then refines. The result is
        still the flow of one stationary velocity, so :meth:`inverse` stays exact."""
        velocity = displacement.clone()
        for _ in range(iterations):
            velocity += displacement - self.integrate(velocity)
        self.velocity_offset = velocity

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(displacement, velocity)``, both ``[1, 3, *S]`` in voxels of the flow grid."""
        velocity = self.velocity()
        return self.integrate(velocity), velocity

    def inverse(self) -> torch.Tensor:
        """Displacement ``[1, 3, *S]`` (voxels) of the inverse transform: the flow of ``-v`` with the same solver."""
        return self.integrate(-self.velocity())


def save_initial_weights(
    model_factory: Callable[..., NeuralODEFlow], path: str | Path, seed: int = 0, shape: Sequence[int] = (32, 32, 32)
) -> Path:
    """Write the velocity network's shape-independent initial weights (what a bundle's ``models/velocity_net_init.pt``
    ships), drawn with ``seed``, to ``path``; never over an existing file. Returns ``path``.

    Args:
        model_factory: builds the flow, ``model_factory(shape=shape)`` (a bundle's ``network_def``).
        path: the new file.
        seed: seed of the initialisation.
        shape: any flow grid: the weights written do not depend on it.
    """
    path = Path(path)
    if path.exists():
        raise RegistrationOutputError(f"'{path}' exists: initial weights are written to a new file, never over one")
    torch.manual_seed(seed)
    flow = model_factory(shape=tuple(shape))
    state = {"velocity_net." + k: v for k, v in flow.velocity_net.shape_independent_state().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path
