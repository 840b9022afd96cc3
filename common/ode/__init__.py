from .adjoint import odeint_adjoint
from .flow import NeuralODEFlow, sample_velocity, save_initial_weights
from .solvers import SOLVERS, odeint
from .velocity import VelocityNet

__all__ = [
    "SOLVERS",
    "NeuralODEFlow",
    "VelocityNet",
    "odeint",
    "odeint_adjoint",
    "sample_velocity",
    "save_initial_weights",
]
