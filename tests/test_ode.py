"""The Neural ODE: solvers, adjoint gradients and the velocity network."""

from __future__ import annotations

import functools

import pytest
import torch

from common.ode import NeuralODEFlow, VelocityNet, odeint
from common.smoothing import RKHSSmoother
from common.spatial import identity_grid

SHAPE = (12, 14, 10)


def _rotation_velocity(shape, angle: float) -> torch.Tensor:
    """Stationary v(x) = W (x - c), W skew-symmetric: its flow is a rotation by ``angle`` about axis 2."""
    grid = identity_grid(shape, dtype=torch.float64)
    c = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64).view(3, 1, 1, 1)
    x = grid - c
    v = torch.zeros_like(x)
    v[0], v[1] = -angle * x[1], angle * x[0]
    return v[None]


@pytest.mark.parametrize("solver,tolerance", [("euler", 0.2), ("midpoint", 0.02), ("rk4", 1e-3)])
def test_flow_of_a_rotation_field_converges_with_the_solver_order(solver, tolerance):
    shape, angle = (21, 21, 5), 0.3
    v = _rotation_velocity(shape, angle)
    flow = NeuralODEFlow(shape, num_steps=8, solver=solver, adjoint=False)
    u = flow.integrate(v)
    c = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64).view(3, 1, 1, 1)
    x = identity_grid(shape, dtype=torch.float64) - c
    rot = torch.tensor(
        [
            [torch.cos(torch.tensor(angle)), -torch.sin(torch.tensor(angle)), 0],
            [torch.sin(torch.tensor(angle)), torch.cos(torch.tensor(angle)), 0],
            [0, 0, 1],
        ],
        dtype=torch.float64,
    )
    expected = torch.einsum("ij,j...->i...", rot, x) - x
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(None))  # away from border clamping
    assert (u[inner] - expected[None][inner]).abs().max() < tolerance


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_adjoint_gradient_matches_backpropagation(solver):
    torch.manual_seed(0)
    v0 = 3 * RKHSSmoother(alpha=4.0)(torch.randn(1, 3, *SHAPE, dtype=torch.float64))
    weight = torch.randn(1, 3, *SHAPE, dtype=torch.float64)
    grads = []
    for adjoint in (True, False):
        v = v0.clone().requires_grad_(True)
        flow = NeuralODEFlow(SHAPE, num_steps=16, solver=solver, adjoint=adjoint)
        (flow.integrate(v) * weight).sum().backward()
        grads.append(v.grad)
    rel = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert rel < 0.02, rel


def test_untrained_network_is_the_identity_and_sizes_follow_the_shape():
    for shape in [(13, 17, 9), (40, 48, 40)]:
        net = VelocityNet(shape, upsample_steps=2, smoother=RKHSSmoother())
        assert net().shape == (1, 3, *shape)
        assert net().abs().max() == 0
    flow = NeuralODEFlow((13, 17, 9), velocity_net=functools.partial(VelocityNet, upsample_steps=0))
    displacement, velocity = flow()
    assert displacement.shape == velocity.shape == (1, 3, 13, 17, 9)
    assert displacement.abs().max() == 0


def test_network_gradients_reach_every_layer_after_one_step():
    flow = NeuralODEFlow(SHAPE, velocity_net=functools.partial(VelocityNet, upsample_steps=1))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        displacement, _ = flow()
        (displacement[:, 0].mean() - 1.0).pow(2).backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())


def test_odeint_rejects_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver"):
        odeint(lambda s: s, (torch.zeros(1),), 2, "heun3")
