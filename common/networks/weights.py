"""Loading trained weights into a network built from a config."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from common.io.errors import input_error

__all__ = ["checkpoint_state_dict", "frozen", "load_weights"]

logger = logging.getLogger(__name__)


def load_weights(module: nn.Module, weights: str | None = None) -> nn.Module:
    """``module`` with the state dict at ``weights`` loaded (on the CPU; move the module afterwards); unchanged when
    ``weights`` is empty or None. Every tensor of the module must be in the file with its shape; tensors of the file
    the module lacks (another head of the same checkpoint, as in Brain-ID's) are left out, with a log line.

    Raises:
        RegistrationInputError: naming the file, when it is missing, unreadable, or does not fit the module (which
            keys are missing or of another shape: the wrong file, or other size settings).
    """
    if weights and not Path(weights).is_file():
        raise input_error(
            "network weights",
            weights,
            "file not found: train them with the bundle's training config (see its docs/README.md), "
            "or pass the path of a trained file",
        )
    if not weights:
        return module
    state, own = checkpoint_state_dict(weights), module.state_dict()
    missing = [k for k in own if k not in state]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or reshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of its {len(own)} tensors missing (e.g. {missing[0]})")
        if reshaped:
            k = reshaped[0]
            problems.append(
                f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                f"{tuple(own[k].shape)} in the network)"
            )
        raise input_error(
            "network weights",
            weights,
            f"does not fit {type(module).__name__}: {'; '.join(problems)}. Is it the right file, and do the network's "
            "size settings match it?",
        )
    extra = [k for k in state if k not in own]
    if extra:
        logger.info(
            f"network weights '{weights}': {len(extra)} tensors the network does not use left out ({extra[0]}, ...)"
        )
    module.load_state_dict({k: state[k] for k in own})
    return module


def frozen(module: nn.Module, weights: str | None = None) -> nn.Module:
    """``module`` with ``weights`` loaded (:func:`load_weights`), in eval mode, without gradients for its parameters:
    a fixed metric or teacher, through which gradients still reach its input."""
    return load_weights(module, weights).eval().requires_grad_(False)


def checkpoint_state_dict(path: str, containers: Sequence[str] = ("model_state_dict", "state_dict")) -> dict:
    """The network weights in a checkpoint file, loaded safely (``weights_only=True``).

    The file may be a state dict itself, or a training checkpoint holding it under one of ``containers`` (VFA's
    ``model_state_dict`` or ``state_dict``) or under the first key that contains ``"model"`` (Brain-ID's). Brain-ID's
    checkpoints also hold the training's ``argparse.Namespace``, the one class beyond tensors and containers that is
    allowed here.

    Raises:
        RegistrationInputError: naming the file, when it is missing, unreadable or holds no state dict.
    """
    if not Path(path).is_file():
        raise input_error("network weights", path, "file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refusals and damaged files alike: the user's file, not our bug
        raise input_error(
            "network weights", path, f"cannot be loaded safely ({type(error).__name__}: {error})"
        ) from None
    if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    if isinstance(checkpoint, dict):
        for key in [*containers, *(k for k in checkpoint if isinstance(k, str) and "model" in k)]:
            if isinstance(checkpoint.get(key), dict):
                return checkpoint[key]
    raise input_error("network weights", path, f"holds no state dict (looked for {', '.join(containers)}, *model*)")
