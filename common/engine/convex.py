"""A starting displacement from a discrete search over descriptor matches, regularised by coupled convex steps.

This is the first stage of ConvexAdam (Siebert, Hansen and Heinrich, 2021): descriptors of both images are compared
for every displacement of a coarse search grid, and the best match per cell is made smooth by alternating between
smoothing the field and choosing, per cell, the displacement that balances its match against its distance from the
smoothed field, with an increasing weight on that distance. It costs seconds on a CPU and brings an instance
optimisation close to its answer before the first iteration.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.spatial.fields import resize_ddf

__all__ = ["CoupledConvexInitializer"]


def _box_smooth(field: torch.Tensor, side: int, passes: int = 2) -> torch.Tensor:
    """``passes`` box filters of ``side`` voxels (edges replicated) on ``[B, C, X, Y, Z]``: a tent-like low-pass."""
    pad = side // 2
    for _ in range(passes):
        field = F.avg_pool3d(F.pad(field, (pad,) * 6, mode="replicate"), side, stride=1)
    return field


def _cell_averages(field: torch.Tensor, sides: Sequence[int], positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Averages of ``field`` ``[B, C, X, Y, Z]`` over boxes of ``sides`` voxels (edges replicated), centred as a
    stride-1 box filter would centre them, read only at ``positions`` along each axis: each position is the regular
    grid ``0, side, 2 side, ...`` with at most one more index after it. Axis by axis, so that each pass reads a
    volume already reduced along the previous axes."""
    for axis, (side, where) in enumerate(zip(sides, positions, strict=True)):
        dim, pad = axis + 2, [0] * 6
        pad[2 * (2 - axis) : 2 * (2 - axis) + 2] = [side // 2, (side - 1) // 2]
        padded = F.pad(field, pad, mode="replicate")
        kernel = [1, 1, 1]
        kernel[axis] = side
        regular = F.avg_pool3d(padded, kernel, stride=kernel)  # at 0, side, 2 side, ... up to the last voxel
        extra = [padded.narrow(dim, p, side).mean(dim, keepdim=True) for p in where[regular.shape[dim] :]]
        field = torch.cat([regular, *extra], dim) if extra else regular
    return field


class CoupledConvexInitializer(nn.Module):
    """Displacement ``[1, 3, X, Y, Z]`` (voxels, pull-back as :class:`~common.engine.RegistrationResult`) that roughly
    aligns ``moving`` to ``fixed``, found by a discrete search and coupled convex regularisation.

    Both images' descriptors are averaged over cells of ``cell_mm``; at search points ``cell_mm`` apart, every
    displacement up to ``search_mm`` along each axis, in steps of ``step_mm``, is scored by the mean squared descriptor
    difference, aggregated over each point's 3x3x3 neighbourhood of search points and scaled to a mean of 1. The best
    match per point then goes through one coupled step per weight of ``coupling``: the field is smoothed (two box
    filters of ``smoothing_cells`` points) and each point takes the displacement ``d`` minimising
    ``cost + weight * |d - smoothed|^2`` (``d`` in mm). The result is the last smoothed field, brought to the image
    grid by trilinear interpolation.

    Args:
        descriptor: module ``[1, 1, X, Y, Z] -> [1, C, X, Y, Z]`` applied to both images (e.g. MIND-SSC).
        cell_mm: spacing of the search points and side of the cells averaged around them, in mm (at least a voxel).
        search_mm: the largest displacement searched along each axis, in mm.
        step_mm: the displacements' step along each axis, in mm (at least a voxel); ``(2 search / step + 1)^3``
            displacements are scored.
        coupling: weights of the coupled steps (per mm² of distance from the smoothed field), positive, increasing.
        smoothing_cells: side in search points of the box filter between coupled steps (odd).
    """

    def __init__(
        self,
        descriptor: nn.Module,
        cell_mm: float = 4.0,
        search_mm: float = 8.0,
        step_mm: float = 4.0,
        coupling: Sequence[float] = (2e-4, 6e-4, 2e-3, 6e-3),
        smoothing_cells: int = 3,
    ) -> None:
        super().__init__()
        if min(cell_mm, step_mm) <= 0 or search_mm < step_mm:
            raise ValueError(
                f"need cell_mm > 0, step_mm > 0 and search_mm >= step_mm, got {cell_mm}, {step_mm} and {search_mm}."
            )
        coupling = [float(w) for w in coupling]
        if any(w <= 0 for w in coupling) or coupling != sorted(coupling):
            raise ValueError(f"coupling weights must be positive and increasing, got {coupling}.")
        if smoothing_cells < 1 or smoothing_cells % 2 == 0:
            raise ValueError(f"smoothing_cells must be odd and positive, got {smoothing_cells}.")
        self.descriptor, self.coupling, self.smoothing_cells = descriptor, coupling, smoothing_cells
        self.cell_mm, self.search_mm, self.step_mm = float(cell_mm), float(search_mm), float(step_mm)

    def _costs(
        self, fixed: torch.Tensor, moving: torch.Tensor, stride: Sequence[int], steps: Sequence[int], radius: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Match costs ``[K, *P]`` of the ``K`` displacements ``[K, 3]`` (voxels) at the search points ``P`` (every
        ``stride`` voxels of the cell-averaged descriptors ``fixed`` and ``moving``, whose last channel is the
        fraction of the cell inside the image's mask)."""
        reach = [radius * st for st in steps]
        padded = F.pad(moving, [p for r in reversed(reach) for p in (r, r)], mode="replicate")
        target = fixed[:, :, :: stride[0], :: stride[1], :: stride[2]]
        points = target.shape[2:]
        inside = target[0, -1] > 0.5
        offsets = list(itertools.product(range(-radius, radius + 1), repeat=3))
        displacements = torch.tensor(offsets, dtype=fixed.dtype, device=fixed.device) * fixed.new_tensor(steps)
        costs, compared = fixed.new_empty(len(offsets), *points), fixed.new_empty(len(offsets), *points)
        target, difference = target[0, :-1], target.new_empty(target.shape[1] - 1, *points)
        # the search points of each displacement are a strided view of the moving descriptor: taking each phase's
        # subsample once makes every view a contiguous block (one phase when the step is a multiple of the stride)
        phases: dict[tuple[int, ...], torch.Tensor] = {}
        for k, offset in enumerate(offsets):
            begin = [r + o * st for r, o, st in zip(reach, offset, steps, strict=True)]
            phase = tuple(b % s for b, s in zip(begin, stride, strict=True))
            if phase not in phases:
                phases[phase] = padded[0, :, phase[0] :: stride[0], phase[1] :: stride[1], phase[2] :: stride[2]]
                phases[phase] = phases[phase].contiguous()
            first = [b // s for b, s in zip(begin, stride, strict=True)]
            shifted = phases[phase][
                :,
                first[0] : first[0] + points[0],
                first[1] : first[1] + points[1],
                first[2] : first[2] + points[2],
            ]
            torch.gt(shifted[-1], 0.5, out=compared[k])
            compared[k] *= inside
            # in place into preallocated buffers: the search is bound by memory traffic, not arithmetic
            torch.sub(target, shifted[:-1], out=difference)
            torch.mean(difference.square_(), dim=0, out=costs[k])
        # each point's neighbourhood of compared points, weighted by how many were compared (all of them when
        # neither image has a mask, which needs no second pooling)
        tiny, every = torch.finfo(costs.dtype).tiny, bool(compared.all())
        costs = _box_smooth((costs if every else costs * compared)[None], 3, passes=1)[0]
        if every:
            return costs / costs.mean().clamp_min(tiny), displacements
        counts = _box_smooth(compared[None], 3, passes=1)[0]
        known = counts > 0
        costs /= counts.clamp_min(tiny)
        costs = costs / costs[known].mean().clamp_min(tiny) if known.any() else costs + 1
        # a displacement that compares nothing (outside the masks) is neither preferred nor avoided
        neutral = (costs * known).sum(0) / known.sum(0).clamp_min(1)
        costs = torch.where(known, costs, torch.where(known.any(0), neutral, torch.ones_like(neutral)))
        return costs, displacements

    @torch.no_grad()
    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        spacing: Sequence[float],
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``fixed`` and ``moving`` ``[1, 1, X, Y, Z]`` on one grid of voxel size ``spacing`` (mm) -> displacement
        ``[1, 3, X, Y, Z]`` in voxels of that grid. Only voxels inside the masks given (``[1, 1, X, Y, Z]``, 1
        inside, on that grid; the moving one before warping) are compared."""
        shape, spacing = fixed.shape[2:], [float(sp) for sp in spacing]
        stride = [max(1, round(self.cell_mm / sp)) for sp in spacing]
        steps = [max(1, round(self.step_mm / sp)) for sp in spacing]
        radius = max(1, round(self.search_mm / self.step_mm))
        # pad the far ends so that the search points' grid ends on the last voxel, corners on corners
        extent = [math.ceil((s - 1) / st) * st + 1 for s, st in zip(shape, stride, strict=True)]
        pads = [p for s, e in zip(reversed(shape), reversed(extent), strict=True) for p in (0, e - s)]
        # with steps that are whole cells every score reads the cell averages at search points only (the last voxel
        # stands for the points past it): computing those alone is stride^3 times less work (4^3 for a 1 mm image)
        on_grid = all(st % sd == 0 for st, sd in zip(steps, stride, strict=True))
        positions = [list(range(0, s, sd)) + ([s - 1] if (s - 1) % sd else []) for s, sd in zip(shape, stride)]
        described = []
        for image, mask in ((fixed, fixed_mask), (moving, moving_mask)):
            d = self.descriptor(image)
            d = torch.cat([d, torch.ones_like(image) if mask is None else mask.to(d)], dim=1)
            if on_grid:
                described.append(_cell_averages(d, stride, positions))
                continue
            d = F.avg_pool3d(
                F.pad(d, [p for st in reversed(stride) for p in (st // 2, (st - 1) // 2)], "replicate"),
                stride,
                stride=1,
            )
            described.append(F.pad(d, pads, mode="replicate"))
        if on_grid:
            lattice_steps = [st // sd for st, sd in zip(steps, stride, strict=True)]
            costs, displacements = self._costs(*described, [1, 1, 1], lattice_steps, radius)
            displacements = displacements * displacements.new_tensor(stride)
        else:
            costs, displacements = self._costs(*described, stride, steps, radius)
        points, costs = costs.shape[1:], costs.flatten(1)
        in_mm = displacements * displacements.new_tensor(spacing)
        squared = in_mm.square().sum(1, keepdim=True)
        # points by displacements, so that each point's choice reduces over contiguous memory
        costs = costs.T.contiguous()
        field = displacements[costs.argmin(1)].T.reshape(1, 3, *points)
        for weight in self.coupling:
            smoothed = _box_smooth(field, self.smoothing_cells) * field.new_tensor(spacing).view(1, 3, 1, 1, 1)
            # |d - s|^2 = |d|^2 - 2 d.s + |s|^2, whose last term is the same for every d of a point
            penalized = torch.addmm(costs, smoothed.flatten(2)[0].T, in_mm.T, alpha=-2 * weight)
            field = displacements[penalized.add_(squared.T, alpha=weight).argmin(1)].T.reshape(1, 3, *points)
        # in voxels of the search grid, as resize_ddf reads a field
        field = _box_smooth(field, self.smoothing_cells) / field.new_tensor(stride).view(1, 3, 1, 1, 1)
        return resize_ddf(field, extent)[:, :, : shape[0], : shape[1], : shape[2]]
