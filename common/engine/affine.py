"""Affine pre-alignment of two scans in world space: centre of mass, then a rigid and an affine stage, coarse to fine,
maximising mutual information (any pair of contrasts)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from monai.utils import convert_to_tensor

from common.io.errors import RegistrationInputError
from common.losses.mutual_information import _weights_mutual_information, parzen_weights
from common.spatial import identity_grid, sample_at, scaled_shape
from common.transforms import ScaleIntensityRangePercentiles

from .optimizer import PairAdam
from .registration import downsample_image

__all__ = ["AffineRegistration", "AffineResult"]

logger = logging.getLogger(__name__)

_MODES = ("auto", "true", "false")
_FOREGROUND = 0.1  # normalised intensity above which a voxel belongs to the head, for the overlap measure
_OVERLAP_MM = 2.0  # the overlap measure's voxel size: fine enough for a small field of view, whatever the levels
# a head at most this fraction of the other's volume is taken for skull-stripped or cropped
_STRIPPED_VOLUME = 0.75


@dataclass
class AffineResult:
    """The affine stage's outcome: ``matrix`` ``[4, 4]`` (float64, RAS mm) maps a fixed-image world point to the moving
    image's world point; the identity when the stage did not run.

    ``overlap`` is the Dice of the two heads (normalised intensity above 0.1, at 2 mm) through the headers alone, which
    decides ``auto``; ``mutual_information`` the value (nats) before and after at the finest level."""

    matrix: torch.Tensor
    ran: bool
    overlap: float
    reason: str
    iterations: list[int] = field(default_factory=list)
    time_s: float = 0.0
    mutual_information: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        """What ``metrics.json`` records of the stage."""
        return {
            "ran": self.ran,
            "reason": self.reason,
            "header_overlap_dice": self.overlap,
            "iterations_per_stage": self.iterations,
            "time_s": self.time_s,
            "mutual_information": self.mutual_information,
            "matrix_ras": self.matrix.tolist(),
        }


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrix ``[3, 3]`` of a rotation vector ``[3]`` (radians), differentiable."""
    x, y, z = angles
    zero = torch.zeros((), dtype=angles.dtype, device=angles.device)
    skew = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])
    return torch.linalg.matrix_exp(skew)


class AffineRegistration:
    """Align ``moving`` to ``fixed`` by an affine map of world space, before deformable registration.

    The translation starts by matching the two images' intensity centres of mass. A rigid stage (rotation and
    translation) then an affine stage (a full linear part) each run at ``levels_mm`` (isotropic voxel sizes, coarse to
    fine), Adam maximising the mutual information (Parzen histograms of ``num_bins`` bins) between the fixed image's
    voxels and the moving image sampled at their mapped positions, over the points that map inside the moving image
    (and inside the masks when given). The result is kept only if it raises the mutual information at the finest
    level above the centre-of-mass start's and the headers' own alignment.

    Args:
        mode: ``"true"`` always runs the stage, ``"false"`` never, ``"auto"`` when the heads overlap through the headers
            by a Dice below ``overlap_threshold`` (pre-aligned pairs, and a skull-stripped image within a head, are left
            as they are).
        stages: ``("rigid", "affine")``, or ``("rigid",)`` for scans of one subject.
        levels_mm: the working voxel sizes (mm), coarse to fine; never finer than the fixed image.
        iterations: Adam steps per level and stage.
        learning_rate: Adam's step at the coarsest level: radians for rotations, mm / 100 for translations (so that one
            rate suits both), and the same for the linear part's entries; halved at each finer level.
        num_bins: histogram bins of the mutual information.
        overlap_threshold: ``auto`` runs the stage below this Dice of the two heads, unless the smaller head, at most
            3/4 of the other's volume (a skull-stripped or cropped image), lies at least this share inside the other.
        max_scale: the affine stage's result is dropped for the rigid one when it scales any direction by more than
            this factor or less than its inverse (two brains rarely differ so much; outlines of different extents do);
            None keeps any scaling.
        normalize: intensity transform of each image; None: the 0.5 and 99.5 percentiles mapped to 0 and 1, clipped.
    """

    def __init__(
        self,
        mode: str | bool = "auto",
        stages: Sequence[str] = ("rigid", "affine"),
        levels_mm: Sequence[float] = (8.0, 4.0),
        iterations: Sequence[int] = (100, 50),
        learning_rate: float = 0.02,
        num_bins: int = 32,
        overlap_threshold: float = 0.9,
        max_scale: float | None = 1.33,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        mode = str(mode).strip().lower()  # a bool (Python API) reads as "true"/"false" too
        if mode not in _MODES:
            raise RegistrationInputError(f"--affine {mode}: the affine stage is auto, true or false")
        if not stages or any(s not in ("rigid", "affine") for s in stages):
            raise ValueError(f"stages must be 'rigid' and/or 'affine', got {list(stages)}.")
        if len(levels_mm) != len(iterations) or not levels_mm or min(levels_mm) <= 0 or min(iterations) < 0:
            raise ValueError(f"one iteration count per positive level: levels_mm {levels_mm}, iterations {iterations}.")
        self.mode, self.stages = mode, tuple(stages)
        self.levels_mm, self.iterations = [float(v) for v in levels_mm], [int(n) for n in iterations]
        if max_scale is not None and max_scale <= 1:
            raise ValueError(f"max_scale bounds the scaling from both sides and must exceed 1, got {max_scale}.")
        self.learning_rate, self.num_bins, self.overlap_threshold = learning_rate, num_bins, overlap_threshold
        self.max_scale = max_scale
        self.normalize = normalize or ScaleIntensityRangePercentiles(0.5, 99.5, b_min=0.0, b_max=1.0, clip=True)

    def __call__(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed_affine: torch.Tensor,
        moving_affine: torch.Tensor,
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> AffineResult:
        """``fixed`` ``[1, X, Y, Z]`` and ``moving`` ``[1, U, V, W]``, each on its own grid with its 4x4 voxel-to-RAS
        affine; masks (1 inside) on their image's grid. Computation follows ``fixed``'s device."""
        identity = torch.eye(4, dtype=torch.float64)
        if self.mode == "false":
            return AffineResult(identity, False, math.nan, "--affine false")
        start = time.perf_counter()
        device = fixed.device
        a_fixed, a_moving = (
            convert_to_tensor(a, dtype=torch.float64, track_meta=False).cpu() for a in (fixed_affine, moving_affine)
        )
        images = [convert_to_tensor(self.normalize(x.float()), track_meta=False)[None] for x in (fixed, moving)]
        masks = [
            None if m is None else m.float().reshape(1, 1, *m.shape[-3:]).to(device) for m in (fixed_mask, moving_mask)
        ]
        header_level = self._level(images[0], a_fixed, images[1], a_moving, masks, _OVERLAP_MM, histogram=False)
        overlap, inside, volume_ratio = self._overlap(header_level, identity)
        # a skull-stripped brain within a whole head is aligned, although their Dice is low; an affine map would only
        # stretch the brain's outline onto the head's
        stripped = volume_ratio <= _STRIPPED_VOLUME and inside >= self.overlap_threshold
        if self.mode == "auto" and (overlap >= self.overlap_threshold or stripped):
            reason = f"auto: the heads overlap by Dice {overlap:.3f} through the headers (>= {self.overlap_threshold})"
            if overlap < self.overlap_threshold:
                reason = (
                    f"auto: one head ({volume_ratio:.2f} of the other's volume: skull-stripped or cropped) lies "
                    f"{inside:.3f} inside the other through the headers (>= {self.overlap_threshold})"
                )
            logger.info(f"affine stage skipped ({reason})")
            return AffineResult(identity, False, overlap, reason, time_s=time.perf_counter() - start)
        finest = self._level(images[0], a_fixed, images[1], a_moving, masks, self.levels_mm[-1])

        centre = finest["centre"]
        start_matrix = self._matrix(torch.eye(3, dtype=torch.float64), centre, finest["moving_centre"] - centre)
        linear, translation = torch.eye(3, dtype=torch.float64), (finest["moving_centre"] - centre)
        done: list[int] = []
        found_by: dict[str, torch.Tensor] = {}
        for stage in self.stages:
            for index, level_mm in enumerate(self.levels_mm):
                level = (
                    finest
                    if index == len(self.levels_mm) - 1
                    else self._level(images[0], a_fixed, images[1], a_moving, masks, level_mm, centre)
                )
                rate = self.learning_rate / 2**index
                linear, translation = self._optimise(level, stage, linear, translation, rate, self.iterations[index])
                done.append(self.iterations[index])
            found_by[stage] = self._matrix(linear, centre, translation)
        found, note = found_by[self.stages[-1]], ""
        scales = torch.linalg.svdvals(found[:3, :3])
        if self.max_scale is not None and (scales.max() > self.max_scale or scales.min() < 1 / self.max_scale):
            # outlines of different extents matched (a brain onto a head), not two brains
            note = f"; its scaling {scales.min():.2f}-{scales.max():.2f} is implausible: kept the rigid map"
            found = found_by.get("rigid", identity)
        scores = {
            name: self._mutual_information(finest, m)
            for name, m in (("headers", identity), ("centre_of_mass", start_matrix), ("affine", found))
        }
        best = max(scores, key=scores.get)
        matrix = {"headers": identity, "centre_of_mass": start_matrix, "affine": found}[best]
        reason = f"{self.mode}: " + (
            "aligned" if best == "affine" else f"kept the {best.replace('_', ' ')} alignment (higher MI)"
        )
        reason += note
        if self.mode == "auto":
            reason += f"; heads overlapped by Dice {overlap:.3f} through the headers (< {self.overlap_threshold})"
        elapsed = time.perf_counter() - start
        logger.info(f"affine stage: {reason} in {elapsed:.1f} s")
        mi = {"before": scores["headers"], "after": scores[best]}
        return AffineResult(matrix, best != "headers", overlap, reason, done, elapsed, mi)

    def _level(
        self,
        fixed: torch.Tensor,
        a_fixed: torch.Tensor,
        moving: torch.Tensor,
        a_moving: torch.Tensor,
        masks: list[torch.Tensor | None],
        level_mm: float,
        centre: torch.Tensor | None = None,
        histogram: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Both images on grids of about ``level_mm`` (smoothed), the fixed voxels' world points (RAS mm, relative to
        ``centre``, by default the fixed image's centre of mass at this level), and what sampling the moving image
        needs; with ``histogram``, also the fixed image's histogram memberships that mutual information reads (half a
        second at 2 mm, which the overlap check alone does not need)."""
        f_spacing = torch.linalg.norm(a_fixed[:3, :3], dim=0).tolist()
        m_spacing = torch.linalg.norm(a_moving[:3, :3], dim=0).tolist()
        f_shape, m_shape = tuple(fixed.shape[2:]), tuple(moving.shape[2:])
        f_level = scaled_shape(f_shape, f_spacing, max(level_mm, min(f_spacing)))
        m_level = scaled_shape(m_shape, m_spacing, max(level_mm, min(m_spacing)))
        fixed_l, moving_l = downsample_image(fixed, f_level), downsample_image(moving, m_level)
        # level voxel i lies at full-grid index i (N - 1) / (n - 1): the grids match corner to corner
        scale = torch.tensor([(n - 1) / max(m - 1, 1) for n, m in zip(f_shape, f_level)], dtype=torch.float64)
        index = identity_grid(f_level, dtype=torch.float64).reshape(3, -1).T * scale
        world = index @ a_fixed[:3, :3].T + a_fixed[:3, 3]
        values = fixed_l.flatten().to(torch.float64).cpu()
        weight = values.clamp(min=0)
        if centre is None:
            centre = (weight[:, None] * world).sum(0) / weight.sum().clamp(min=1e-12)
        m_index = identity_grid(m_level, dtype=torch.float64).reshape(3, -1).T * torch.tensor(
            [(n - 1) / max(m - 1, 1) for n, m in zip(m_shape, m_level)], dtype=torch.float64
        )
        m_world = m_index @ a_moving[:3, :3].T + a_moving[:3, 3]
        m_weight = moving_l.flatten().to(torch.float64).cpu().clamp(min=0)
        moving_centre = (m_weight[:, None] * m_world).sum(0) / m_weight.sum().clamp(min=1e-12)
        fixed_weight = torch.ones_like(fixed_l.flatten())
        if masks[0] is not None:
            fixed_weight = downsample_image(masks[0], f_level).flatten()
        return {
            "fixed": fixed_l.flatten(),
            # the fixed image's histogram memberships do not change while the moving image moves
            "fixed_parzen": parzen_weights(fixed_l.flatten(), self.num_bins) if histogram else None,
            "fixed_weight": fixed_weight,
            "points": (world - centre).to(device=fixed.device, dtype=torch.float32),
            "centre": centre,
            "moving_centre": moving_centre,
            "moving": moving_l,
            "moving_mask": None if masks[1] is None else downsample_image(masks[1], m_level),
            "world_to_moving": torch.linalg.inv(a_moving),
            "moving_shape": torch.tensor(m_shape, dtype=torch.float64),
        }

    @staticmethod
    def _matrix(linear: torch.Tensor, centre: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        """The 4x4 world map ``x -> L (x - c) + c + t``."""
        matrix = torch.eye(4, dtype=torch.float64)
        matrix[:3, :3] = linear.detach().to(torch.float64).cpu()
        matrix[:3, 3] = centre + translation.detach().to(torch.float64).cpu() - matrix[:3, :3] @ centre
        return matrix

    def _sample(
        self, level: dict[str, torch.Tensor], linear: torch.Tensor, translation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The moving image at the mapped fixed points ``[N]`` (0 outside it) and each point's weight ``[N]`` (0
        outside the masks)."""
        centre = level["centre"].to(level["points"])
        mapped = level["points"] @ linear.T + centre + translation  # world RAS mm
        to_moving = level["world_to_moving"].to(mapped)
        index = mapped @ to_moving[:3, :3].T + to_moving[:3, 3]
        size = level["moving_shape"].to(mapped)
        normalised = 2 * index / (size - 1).clamp(min=1) - 1
        inside = (normalised.abs() <= 1).all(dim=1).to(normalised)
        # outside the moving image reads as background (0) rather than being left out: a mutual information over
        # the overlap alone rewards shrinking the overlap onto its easiest part
        values = sample_at(level["moving"], normalised)[0, 0] * inside
        weight = level["fixed_weight"]
        if level["moving_mask"] is not None:
            weight = weight * sample_at(level["moving_mask"], normalised)[0, 0]
        return values, weight

    @staticmethod
    def _parameters(level: dict[str, torch.Tensor], matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, t)`` of a 4x4 world map written as ``x -> L (x - c) + c + t`` about the level's centre ``c``, on the
        level's device (the inverse of :meth:`_matrix`)."""
        centre, device = level["centre"], level["points"].device
        translation = matrix[:3, :3] @ centre + matrix[:3, 3] - centre
        return matrix[:3, :3].float().to(device), translation.float().to(device)

    def _mutual_information(self, level: dict[str, torch.Tensor], matrix: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self._objective(level, *self._parameters(level, matrix)).neg())

    def _objective(
        self, level: dict[str, torch.Tensor], linear: torch.Tensor, translation: torch.Tensor
    ) -> torch.Tensor:
        values, weight = self._sample(level, linear, translation)
        wa = parzen_weights(values, self.num_bins)
        return -_weights_mutual_information(wa, level["fixed_parzen"], mask=weight)

    def _overlap(self, level: dict[str, torch.Tensor], matrix: torch.Tensor) -> tuple[float, float, float]:
        """Of the two heads (normalised intensity above 0.1) with the moving one mapped by ``matrix``: their Dice, the
        share of the smaller one inside the larger, and the smaller one's volume over the larger's."""
        with torch.no_grad():
            values, _ = self._sample(level, *self._parameters(level, matrix))
        a = level["fixed"] > _FOREGROUND
        b = values > _FOREGROUND
        both, sizes = float((a & b).sum()), sorted([float(a.sum()), float(b.sum())])
        return 2 * both / max(sum(sizes), 1.0), both / max(sizes[0], 1.0), sizes[0] / max(sizes[1], 1.0)

    def _optimise(
        self,
        level: dict[str, torch.Tensor],
        stage: str,
        linear: torch.Tensor,
        translation: torch.Tensor,
        rate: float,
        steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` Adam steps of one stage at one level from ``(linear, translation)``; the lowest-loss state."""
        device = level["points"].device
        base = linear.to(device=device, dtype=torch.float32)
        shift = (translation.to(device=device, dtype=torch.float32) / 100).requires_grad_(True)
        angles = torch.zeros(3, device=device, requires_grad=True)
        delta = torch.zeros(3, 3, device=device, requires_grad=True)
        params = [shift, angles] if stage == "rigid" else [shift, delta]
        optimizer = PairAdam(params, lr=rate)

        def current() -> torch.Tensor:
            return _rotation(angles) @ base if stage == "rigid" else base + delta

        best = (math.inf, base.detach().clone(), shift.detach().clone() * 100)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = self._objective(level, current(), shift * 100)
            if loss.item() < best[0]:
                best = (loss.item(), current().detach().clone(), shift.detach().clone() * 100)
            loss.backward()
            optimizer.step()
        return best[1].double().cpu(), best[2].double().cpu()
