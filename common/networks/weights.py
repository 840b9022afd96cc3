"""Loading trained weights into a network built from a config."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from common.io.errors import input_error

__all__ = ["frozen", "load_weights"]


def load_weights(module: nn.Module, weights: str | None = None) -> nn.Module:
    """``module`` with the state dict at ``weights`` loaded strictly (on the CPU; move the module afterwards);
    unchanged when ``weights`` is empty or None."""
    if weights and not Path(weights).is_file():
        raise input_error(
            "network weights",
            weights,
            "file not found: train them with the bundle's training config (see its docs/README.md), "
            "or pass the path of a trained file",
        )
    if weights:
        module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return module


def frozen(module: nn.Module, weights: str | None = None) -> nn.Module:
    """``module`` with ``weights`` loaded (:func:`load_weights`), in eval mode, without gradients for its parameters:
    a fixed metric or teacher, through which gradients still reach its input."""
    return load_weights(module, weights).eval().requires_grad_(False)
