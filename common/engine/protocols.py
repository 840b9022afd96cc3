"""What the registration engines expect of their collaborators, and what they give back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "InvertibleModel",
    "LocalDescriptor",
    "MultiStartModel",
    "PairRegistration",
    "PatchSimilarity",
    "RegistrationResult",
    "RegistrationStats",
    "StartableModel",
]


@runtime_checkable
class LocalDescriptor(Protocol):
    """A descriptor ``[B, 1, X, Y, Z] -> [B, C, X, Y, Z]`` whose value at a voxel depends only on image values within
    ``reach`` voxels of it (MIND-SSC), so that it can be computed on a block grown by ``reach``."""

    reach: int

    def __call__(self, image: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class MultiStartModel(Protocol):
    """A network that can begin a pair from one of several named fields (e.g. a frozen backbone's prediction or the
    identity): ``starts`` names them, ``start`` is the one in use."""

    starts: tuple[str, ...]
    start: str


@runtime_checkable
class PatchSimilarity(Protocol):
    """A similarity ``(pred, target) -> scalar`` that compares cubic patches of ``patch_size`` voxels a side (local MI):
    given voxels in whole consecutive patches, it compares each patch."""

    patch_size: int

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


@dataclass
class RegistrationStats:
    """How a registration ran: optimiser steps and seconds per stage, the loss it ended with, its working grid, and
    what the engine decided for this pair (``decisions``, e.g. whether a style transfer ran)."""

    iterations: list[int] = field(default_factory=list)
    stage_time_s: list[float] = field(default_factory=list)
    final_loss: float = math.nan
    grid: list[int] = field(default_factory=list)
    decisions: dict[str, float | bool | str] = field(default_factory=dict)


@dataclass
class RegistrationResult:
    """A pair's displacement ``ddf`` ``[1, 3, X, Y, Z]`` in voxels of the fixed grid (pull-back: warped(x) =
    moving(x + ddf(x))), its inverse ``inverse_ddf`` on the same grid (``y -> y + inverse_ddf(y)`` undoes
    ``x -> x + ddf(x)``) and how they were found."""

    ddf: torch.Tensor
    stats: RegistrationStats
    inverse_ddf: torch.Tensor | None = None


@runtime_checkable
class InvertibleModel(Protocol):
    """A transform model that computes its own inverse (a stationary velocity field: the flow of ``-v``), returning
    the inverse displacement on its grid."""

    def inverse(self) -> torch.Tensor: ...


@runtime_checkable
class StartableModel(Protocol):
    """A transform model that can start its optimisation from a given displacement ``[1, 3, *S]`` (voxels of its grid)
    instead of the identity."""

    def start_from(self, displacement: torch.Tensor) -> None: ...


class PairRegistration(Protocol):
    """Registers ``moving`` to ``fixed``, both ``[1, 1, X, Y, Z]`` on one grid of voxel size ``spacing`` (mm),
    comparing them only inside the masks given (``[1, 1, X, Y, Z]``, 1 inside, on that grid; the moving one before
    warping)."""

    def __call__(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        spacing: Sequence[float],
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> RegistrationResult: ...
