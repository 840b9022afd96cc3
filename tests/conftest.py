"""Shared fixtures: a small labelled head phantom and the path of the shared reference data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.spatial import identity_grid, warp

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# FreeSurfer values, so that common.synthesis renders realistic contrasts
WM, CORTEX, VENTRICLE, THALAMUS = 2, 3, 4, 10


def phantom_labels(shape=(36, 40, 34)) -> torch.Tensor:
    """Nested ellipsoids (cortex around white matter, two thalami, a ventricle), ``[X, Y, Z]`` int64.

    No outer CSF layer: in T1 it is as dark as the background, so its outer edge has no counterpart across contrasts.
    """
    grid = identity_grid(shape)
    c = torch.tensor([(s - 1) / 2 for s in shape]).view(3, 1, 1, 1)
    x = (grid - c) / torch.tensor([s / 2 for s in shape]).view(3, 1, 1, 1)

    def inside(center, radii) -> torch.Tensor:
        ctr = torch.tensor(center).view(3, 1, 1, 1)
        r = torch.tensor(radii).view(3, 1, 1, 1)
        return (((x - ctr) / r) ** 2).sum(0) <= 1

    labels = torch.zeros(shape, dtype=torch.int64)
    labels[inside((0, 0, 0), (0.78, 0.78, 0.72))] = CORTEX
    labels[inside((0, 0, 0), (0.62, 0.62, 0.56))] = WM
    labels[inside((-0.25, 0.1, 0), (0.15, 0.2, 0.18))] = THALAMUS
    labels[inside((0.25, 0.1, 0), (0.15, 0.2, 0.18))] = THALAMUS
    labels[inside((0, -0.2, 0.1), (0.08, 0.3, 0.12))] = VENTRICLE
    return labels


def smooth_field(shape, amplitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth random displacement ``[1, 3, *shape]`` (voxels) with max norm about ``amplitude``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=g)
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    return amplitude * field / field.norm(dim=1).max()


def invert_field(ddf: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Fixed-point inverse ``v = -u(x + v)`` of a small smooth displacement."""
    inverse = -ddf
    for _ in range(iterations):
        inverse = -warp(ddf, inverse)
    return inverse


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (only present beside a development checkout)")
    return SHARED_DATA
