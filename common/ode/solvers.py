"""Fixed-step explicit ODE solvers on tuples of tensors.

A state is a tuple of tensors and ``func(state) -> derivative`` returns a tuple of the same structure; autonomous
systems only (the registration flows are stationary), so no time argument is passed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

State = tuple[torch.Tensor, ...]
Dynamics = Callable[[State], State]


def _axpy(state: State, h: float, slope: State) -> State:
    return tuple(s + h * k for s, k in zip(state, slope))


def euler_step(func: Dynamics, state: State, h: float) -> State:
    """Forward Euler: one evaluation of ``func``, first order."""
    return _axpy(state, h, func(state))


def midpoint_step(func: Dynamics, state: State, h: float) -> State:
    """Explicit midpoint (RK2): two evaluations, second order."""
    k1 = func(state)
    return _axpy(state, h, func(_axpy(state, h / 2, k1)))


def rk4_step(func: Dynamics, state: State, h: float) -> State:
    """Classical Runge-Kutta: four evaluations, fourth order."""
    k1 = func(state)
    k2 = func(_axpy(state, h / 2, k1))
    k3 = func(_axpy(state, h / 2, k2))
    k4 = func(_axpy(state, h, k3))
    slope = tuple((a + 2 * b + 2 * c + d) / 6 for a, b, c, d in zip(k1, k2, k3, k4))
    return _axpy(state, h, slope)


SOLVERS: dict[str, Callable[[Dynamics, State, float], State]] = {
    "euler": euler_step,
    "midpoint": midpoint_step,
    "rk4": rk4_step,
}


def odeint(func: Dynamics, state: State, num_steps: int, method: str = "euler", t_span: float = 1.0) -> State:
    """Integrate ``d state / dt = func(state)`` over ``t_span`` in ``num_steps`` equal steps (negative span: backward)."""
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose one of {sorted(SOLVERS)}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}.")
    step, h = SOLVERS[method], t_span / num_steps
    for _ in range(num_steps):
        state = step(func, state, h)
    return state
