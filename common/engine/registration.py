"""Instance optimisation: fit a transform model to one image pair, coarse to fine, on an ignite engine."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from common.io import switch
from common.losses.objective import RegistrationObjective
from common.spatial import (
    block_points,
    invert_ddf,
    mask_tiles,
    random_blocks,
    random_blocks_in,
    random_voxels,
    random_voxels_in,
    resize_ddf,
    scaled_shape,
    warp,
    warp_at,
)
from common.transforms import ScaleIntensityRangePercentiles

from .optimizer import BestState, PairAdam, create_pair_engine
from .precision import autocast_bfloat16, check_amp
from .protocols import (
    InvertibleModel,
    LocalDescriptor,
    PatchSimilarity,
    RegistrationResult,
    RegistrationStats,
    StartableModel,
)

if TYPE_CHECKING:  # the gate module imports this one
    from .gate import AnatomyGate

logger = logging.getLogger(__name__)


def downsample_image(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Box-blur then resample ``[B, C, X, Y, Z]`` onto ``shape``, grids matched corner to corner."""
    if tuple(image.shape[2:]) == tuple(shape):
        return image
    factor = max(n / m for n, m in zip(image.shape[2:], shape))
    k = 2 * int(factor // 2) + 1
    if k > 1:
        image = F.avg_pool3d(image, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
    return F.interpolate(image, size=tuple(shape), mode="trilinear", align_corners=True)


def _level_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A mask ``[1, 1, X, Y, Z]`` on a stage's grid ``[*shape]`` (bool): voxels at least half inside, or, for a mask
    too small for that grid, every voxel it touches."""
    level = downsample_image(mask.float(), shape)[0, 0]
    inside = level >= 0.5
    return inside if bool(inside.any()) else level > 0


class InstanceOptimizationInferer(Inferer):
    """Register a pair by optimising a transform model's parameters on that pair alone.

    The transform model, built by ``model_factory(shape=flow_shape)``, returns ``(displacement, velocity)`` on a flow
    grid ``flow_downsample`` times coarser than the image (e.g. :class:`common.ode.NeuralODEFlow`). It minimises
    ``objective`` (:class:`~common.losses.RegistrationObjective`) with Adam over ``levels`` (coarse to fine image
    grids), each for its number of ``iterations``; the objective's inputs are ``similarity`` (computed here:
    ``similarity(D(warped), D(fixed))`` with ``D`` the descriptor, identity when None, over all voxels or random
    ones), ``ddf`` (the displacement on the flow grid) and ``velocity``. Each stage ends with the parameters of its
    lowest loss, except a stage that compares random voxels (:meth:`is_sampled`), which ends with its last parameters.

    Args:
        model_factory: builds the transform model for a flow grid, ``model_factory(shape=(X, Y, Z)) -> nn.Module``
            (e.g. a bundle's ``network_def`` in callable mode).
        objective: the weighted terms minimised, e.g. the similarity, a Jacobian barrier, smoothness and the
            velocity's magnitude.
        similarity: loss ``(pred, target) -> scalar`` on descriptors ``[1, C, X, Y, Z]``, passed to the objective as
            its input ``similarity``.
        descriptor: module ``[1, 1, X, Y, Z] -> [1, C, X, Y, Z]``, or None to compare intensities.
        warp_descriptor: warp the moving image's descriptor (computed once per stage) instead of recomputing the
            descriptor of the warped image every iteration; faster, and equal for smooth deformations. One flag for
            all stages or one per stage (e.g. ``(True, False)``: a cheap first stage on the warped descriptor,
            refined on the recomputed one).
        levels: the images' grid at each stage, coarse to fine, as ``levels_unit`` says, e.g. ``(2, 1)``.
        levels_unit: ``"factor"``: downsampling factors of the image grid (2: half the voxels along each axis);
            ``"mm"``: voxel sizes in mm (as ANTs' ``mm`` smoothing sigmas), never finer than the image along any axis,
            so that ``(2, 1)`` runs at 2 then 1 mm on a 1 mm image and twice at 2 mm on a 2 mm image. A descriptor
            trained at one scale wants ``"mm"``: factors put a 2 mm image's coarse stage at 4 mm. A stage that would
            repeat the stage before it (the same grid and the same ``warp_descriptor``) is skipped: its iterations
            were set for detail the image does not have, so a schedule ending at 1 mm costs a 2 mm image no more
            than its stages down to 2 mm.
        iterations: Adam steps at each stage; a stage of 0 is skipped.
        learning_rate: Adam learning rate.
        flow_downsample: the flow grid's isotropic voxel size as a multiple of the image's finest voxel size (2: a
            2 mm flow grid for a 1 mm image, 4 mm for 2 mm; never finer than the image along any axis); one value
            for all stages or one per stage (matched from the finest stage back; extra coarse stages take the
            first). A stage on another flow grid than the stage before it starts a new model (a
            :class:`~common.engine.StartableModel`) from the displacement reached so far.
        time_budget_s: stop after this many seconds over all stages (None: no limit).
        patience, tolerance: convergence stopping per stage (see :func:`create_pair_engine`); 0 disables.
        initial_weights: path of a state dict loaded (non-strictly) into the model before optimisation.
        seed: seed of the model's random initialisation, for reproducible runs.
        progress: show progress bars.
        sample_points: at stages with more voxels than this, compare descriptors at this many random voxels per
            iteration (a stochastic gradient, as elastix's random sampler) instead of at all voxels; None: all.
            A :class:`~common.engine.PatchSimilarity` (local MI) gets whole random patches instead. When the
            descriptor is recomputed (``warp_descriptor`` False) and is a :class:`~common.engine.LocalDescriptor`
            (MIND-SSC), the points
            come in random blocks of ``sample_block`` voxels a side, whose descriptor is computed from the warped
            moving image on the block grown by ``reach``, at stages where the grown blocks hold fewer voxels than the
            image; another descriptor sees the whole image.
        sample_block: side (voxels) of the blocks of recomputed descriptors.
        normalize: intensity transform of each image before registration; None: the 0.5 and 99.5 percentiles
            mapped to 0 and 1, clipped.
        initializer: optional ``(fixed, moving, spacing, fixed_mask, moving_mask) -> displacement``
            ``[1, 3, X, Y, Z]`` (voxels of the image grid, e.g. :class:`~common.engine.CoupledConvexInitializer`) on
            the normalised full-resolution images; the model (a :class:`~common.engine.StartableModel`) starts from
            it instead of the identity.
        amp: compute the descriptor in bfloat16 (True, False or ``"auto"``: only where the hardware computes it,
            :func:`~common.engine.autocast_bfloat16`), for a learned descriptor whose convolutions dominate an
            iteration; the similarity, the field and the optimiser stay in float32.
        anatomy_gate: an :class:`~common.engine.AnatomyGate`: a pair it finds to show one anatomy (one subject's
            scans) is registered with ``same_anatomy_objective`` instead of ``objective``, e.g. a stronger
            regulariser: weights tuned for two subjects' brains move one brain's scans by what their contrasts
            differ in. Its decision and NMI go to the result's ``decisions``.
        same_anatomy_objective: the objective of such a pair (given with ``anatomy_gate``).
    """

    def __init__(
        self,
        model_factory: Callable[..., nn.Module],
        objective: RegistrationObjective,
        similarity: nn.Module,
        descriptor: nn.Module | None = None,
        warp_descriptor: bool | Sequence[bool] = False,
        levels: Sequence[float] = (2, 1),
        levels_unit: str = "factor",
        iterations: Sequence[int] = (250, 50),
        learning_rate: float = 5e-3,
        flow_downsample: float | Sequence[float] = 2.0,
        time_budget_s: float | None = None,
        patience: int = 0,
        tolerance: float = 1e-3,
        initial_weights: str | None = None,
        seed: int = 0,
        progress: bool = True,
        sample_points: int | None = None,
        sample_block: int = 16,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
        initializer: Callable[..., torch.Tensor] | None = None,
        amp: bool | str = False,
        anatomy_gate: AnatomyGate | None = None,
        same_anatomy_objective: RegistrationObjective | None = None,
    ) -> None:
        super().__init__()
        if (anatomy_gate is None) != (same_anatomy_objective is None):
            raise ValueError("anatomy_gate and same_anatomy_objective go together: give both or neither.")
        self.anatomy_gate, self.same_anatomy_objective = anatomy_gate, same_anatomy_objective
        self.model_factory, self.initializer = model_factory, initializer
        self.amp = check_amp(amp)
        if len(levels) != len(iterations):
            raise ValueError(f"levels {list(levels)} and iterations {list(iterations)} must have the same length.")
        if levels_unit not in ("factor", "mm"):
            raise ValueError(f"levels_unit must be 'factor' or 'mm', got {levels_unit!r}.")
        warp_descriptor = switch(warp_descriptor, "inferer#warp_descriptor")
        if isinstance(warp_descriptor, bool):
            warp_descriptor = [warp_descriptor] * len(levels)
        if len(warp_descriptor) != len(levels):
            raise ValueError(f"warp_descriptor {list(warp_descriptor)} needs one flag per level of {list(levels)}.")
        self.similarity, self.descriptor = similarity, descriptor
        self.warp_descriptor = [bool(w) for w in warp_descriptor]
        self.levels, self.levels_unit = [float(f) for f in levels], levels_unit
        self.iterations = [int(n) for n in iterations]
        if min(self.iterations) < 0:
            raise ValueError(f"iterations {self.iterations} must not be negative.")
        factors = [flow_downsample] if isinstance(flow_downsample, (int, float)) else list(flow_downsample)
        if not factors or min(factors) <= 0:
            raise ValueError(f"flow_downsample {flow_downsample} needs positive factors, one or one per level.")
        # aligned at the finest stage, so that a schedule given other levels (--inferer#levels "[1]") still runs
        flow_downsample = [factors[0]] * max(0, len(levels) - len(factors)) + factors[-len(levels) :]
        self.learning_rate, self.flow_downsample = learning_rate, [float(f) for f in flow_downsample]
        self.objective = objective
        self.time_budget_s, self.patience, self.tolerance = time_budget_s, patience, tolerance
        self.initial_weights, self.seed, self.progress = initial_weights, seed, progress
        self.sample_points, self.sample_block = sample_points, sample_block
        self.normalize = normalize or ScaleIntensityRangePercentiles(0.5, 99.5, b_min=0.0, b_max=1.0, clip=True)

    def level_shape(self, shape: Sequence[int], spacing: Sequence[float], level: float) -> tuple[int, ...]:
        """The image grid of a stage at ``level`` for an image of ``shape`` and voxel size ``spacing`` (mm)."""
        if self.levels_unit == "mm":
            return scaled_shape(shape, spacing, level)
        return tuple(max(2, math.ceil(s / level)) for s in shape)

    def _describe(self, image: torch.Tensor) -> torch.Tensor:
        if self.descriptor is None:
            return image
        with autocast_bfloat16(image.device, self.amp):
            return self.descriptor(image).float()

    def _blocks(self, shape: Sequence[int]) -> tuple[list[int], int]:
        """Side and number of the random blocks of recomputed descriptors on a grid of ``shape``."""
        block = [min(self.sample_block, s) for s in shape]
        return block, max(1, self.sample_points // math.prod(block))

    def is_sampled(self, shape: Sequence[int], warp_descriptor: bool) -> bool:
        """Whether a stage on a grid of ``shape`` compares descriptors at random voxels (a stochastic loss), given
        whether it warps the moving image's descriptor."""
        if not self.sample_points:
            return False
        if warp_descriptor:
            return math.prod(shape) > self.sample_points
        if not isinstance(self.descriptor, LocalDescriptor):
            return False
        reach = self.descriptor.reach
        block, count = self._blocks(shape)
        # recomputed in blocks only where the grown blocks hold fewer voxels than the whole image
        return count * math.prod(b + 2 * reach for b in block) < math.prod(shape)

    def _similarity(
        self,
        displacement: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        warp_descriptor: bool,
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Similarity of the target and the source warped by ``displacement`` (flow grid) on the target's grid; the
        source is the moving image's descriptor if ``warp_descriptor``, else the moving image. With masks (the
        fixed one ``[X, Y, Z]`` bool, the moving one ``[1, 1, X, Y, Z]`` on the fixed grid, before warping), only
        voxels inside the fixed mask and the warped moving mask are compared (for a patch similarity, whole patches
        whose centre is inside)."""
        shape = target.shape[2:]
        masked = fixed_mask is not None or moving_mask is not None
        if not self.is_sampled(shape, warp_descriptor):
            warped = warp(source, resize_ddf(displacement, shape))
            warped = warped if warp_descriptor else self._describe(warped)
            if not masked:
                return self.similarity(warped, target)
            inside = fixed_mask if fixed_mask is not None else torch.ones(shape, dtype=torch.bool, device=target.device)
            if isinstance(self.similarity, PatchSimilarity):
                patch = (self.similarity.patch_size,) * 3
                points = block_points(mask_tiles(inside, patch), patch)
            else:
                points = inside.nonzero()
        elif warp_descriptor:
            points = self._random_points(shape, target.device, fixed_mask)
            warped = warp_at(displacement, source, points, shape)
        else:
            # the descriptor of each random block, from the warped moving image on the block grown by its reach
            reach = self.descriptor.reach
            block, count = self._blocks(shape)
            if fixed_mask is None:
                origins = random_blocks(shape, block, count, target.device)
            else:
                origins = random_blocks_in(fixed_mask, block, count)
            values = warp_at(displacement, source, block_points(origins, block, reach), shape)
            described = self._describe(values.view(count, 1, *[b + 2 * reach for b in block]))
            inner = described[:, :, reach : reach + block[0], reach : reach + block[1], reach : reach + block[2]]
            warped = inner.transpose(0, 1).reshape(1, described.shape[1], -1)
            points = block_points(origins, block)
        if moving_mask is not None:
            keep = self._inside_warped_mask(displacement, moving_mask, points, shape)
            points = points[keep]
            warped = warped[:, :, keep] if warped.ndim == 3 else warped
        index = (points[:, 0] * shape[1] + points[:, 1]) * shape[2] + points[:, 2]
        if warped.ndim != 3:
            warped = warped.flatten(2)[:, :, index]
        return self.similarity(warped, target.flatten(2)[:, :, index])

    def _inside_warped_mask(
        self, displacement: torch.Tensor, moving_mask: torch.Tensor, points: torch.Tensor, shape: Sequence[int]
    ) -> torch.Tensor:
        """Which ``points`` ``[N]`` the moving mask covers after warping (whole patches by their centre, for a patch
        similarity); all of them when it covers none, so that the similarity stays defined."""
        with torch.no_grad():
            inside = warp_at(displacement, moving_mask, points, shape)[0, 0] > 0.5
        if isinstance(self.similarity, PatchSimilarity):
            size = self.similarity.patch_size**3
            inside = inside.view(-1, size)[:, size // 2 : size // 2 + 1].expand(-1, size).reshape(-1)
        return inside if bool(inside.any()) else torch.ones_like(inside)

    def _random_points(
        self, shape: Sequence[int], device: torch.device, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``sample_points`` random voxel indices ``[N, 3]`` of a grid of ``shape`` (inside ``mask`` ``[X, Y, Z]``
        when given), in whole patches for a :class:`~common.engine.PatchSimilarity`:
        ``N = sample_points // patch_size**3`` patches of ``patch_size**3`` consecutive points each."""
        if not isinstance(self.similarity, PatchSimilarity):
            return (
                random_voxels(shape, self.sample_points, device)
                if mask is None
                else random_voxels_in(mask, self.sample_points)
            )
        patch = self.similarity.patch_size
        count = max(1, self.sample_points // patch**3)
        if mask is None:
            origins = random_blocks(shape, (patch,) * 3, count, device)
        else:
            origins = random_blocks_in(mask, (patch,) * 3, count)
        return block_points(origins, (patch,) * 3)

    def build_model(self, shape: Sequence[int], device: torch.device) -> nn.Module:
        """The transform model for a flow grid of ``shape``, seeded and with the initial weights loaded."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.model_factory(shape=tuple(shape))
        if self.initial_weights:
            state = torch.load(self.initial_weights, map_location="cpu", weights_only=True)
            unexpected = model.load_state_dict(state, strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"initial weights {self.initial_weights} hold unknown parameters: {unexpected[:5]}")
        return model.to(device)

    def __call__(  # type: ignore[override]
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        spacing: Sequence[float],
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> RegistrationResult:
        """Register ``moving`` to ``fixed``, both ``[1, 1, X, Y, Z]`` on the same grid of voxel size ``spacing`` mm,
        comparing them only inside the masks given (``[1, 1, X, Y, Z]``, 1 inside, on that grid; the moving one
        before warping); the result's grid is the flow grid."""
        device, shape = fixed.device, tuple(fixed.shape[2:])
        stats, objective = RegistrationStats(), self.objective
        if self.anatomy_gate is not None:
            one_anatomy, nmi = self.anatomy_gate(fixed.float(), moving.float(), fixed_mask)
            stats.decisions.update({"same_anatomy": one_anatomy, "anatomy_nmi": round(nmi, 4)})
            objective = self.same_anatomy_objective if one_anatomy else objective
        fixed, moving = (convert_to_tensor(self.normalize(x.float()), track_meta=False) for x in (fixed, moving))
        if isinstance(self.descriptor, nn.Module):
            self.descriptor.to(device)  # a learned descriptor follows the images
        finest = min(float(sp) for sp in spacing)
        flow_shapes = [scaled_shape(shape, spacing, f * finest) for f in self.flow_downsample]
        start = time.perf_counter()
        model, optimizer, model_shape = None, None, None

        def start_model(
            flow_shape: tuple[int, ...], previous_model: nn.Module | None
        ) -> tuple[nn.Module, torch.optim.Optimizer]:
            """The model on ``flow_shape``, started from the previous model's displacement or the initializer's."""
            with torch.no_grad():
                if previous_model is not None:
                    displacement = resize_ddf(previous_model()[0], flow_shape)
                elif self.initializer is not None:
                    start_ddf = self.initializer(fixed, moving, spacing, fixed_mask, moving_mask)
                    displacement = resize_ddf(start_ddf, flow_shape)
                    stats.decisions["initializer_s"] = round(time.perf_counter() - start, 2)
                else:
                    displacement = None
            new = self.build_model(flow_shape, device)
            if displacement is not None:
                if not isinstance(new, StartableModel):
                    raise TypeError(
                        f"{type(new).__name__} cannot start from a displacement (initializer, new flow grid)."
                    )
                new.start_from(displacement)
            return new, PairAdam(new.parameters(), lr=self.learning_rate, amsgrad=True)

        previous = None
        for level, (grid, num_iterations, warp_descriptor, flow_shape) in enumerate(
            zip(self.levels, self.iterations, self.warp_descriptor, flow_shapes)
        ):
            level_shape = self.level_shape(shape, spacing, grid)
            skip = None
            if num_iterations == 0:
                skip = "no iterations"
            elif (level_shape, warp_descriptor, flow_shape) == previous:
                skip = f"repeats stage {level} on this image's grid"
            if skip:
                logger.info(f"stage {level + 1} {skip}: skipped")
                stats.iterations.append(0)
                stats.stage_time_s.append(0.0)
                continue
            if flow_shape != model_shape:
                model, optimizer = start_model(flow_shape, model)
                model_shape = flow_shape
            previous = (level_shape, warp_descriptor, flow_shape)
            fixed_l, moving_l = downsample_image(fixed, level_shape), downsample_image(moving, level_shape)
            fixed_mask_l = None if fixed_mask is None else _level_mask(fixed_mask, level_shape)
            moving_mask_l = None if moving_mask is None else downsample_image(moving_mask.float(), level_shape)
            with torch.no_grad():
                target = self._describe(fixed_l)
                source = self._describe(moving_l) if warp_descriptor else moving_l
                if warp_descriptor:
                    # each sampled point reads all channels of 8 voxels: with the channels innermost they are
                    # adjacent in memory (24 channels at 80x96x80 on the CPU: 4x faster forward and backward)
                    source = source.contiguous(memory_format=torch.channels_last_3d)
            # on a loss of random voxels the lowest value marks a lucky draw, not a better transform (at 1 mm it came
            # from the 6th of 35 iterations), so such a stage keeps its last state
            best = None if self.is_sampled(level_shape, warp_descriptor) else BestState()

            def step(
                source=source,
                target=target,
                warp_descriptor=warp_descriptor,
                best=best,
                masks=(fixed_mask_l, moving_mask_l),
                model=model,
                optimizer=optimizer,
            ) -> dict[str, float]:
                optimizer.zero_grad()
                displacement, velocity = model()
                sim = self._similarity(displacement, source, target, warp_descriptor, *masks)
                loss = objective(similarity=sim, ddf=displacement, velocity=velocity)
                loss.backward()
                if best is not None:
                    best.update(loss.item(), model)
                optimizer.step()
                return {"loss": loss.item(), **objective.values}

            remaining = None if self.time_budget_s is None else self.time_budget_s - (time.perf_counter() - start)
            if remaining is not None and remaining <= 0:
                logger.info(f"time budget spent: skipping stage {level + 1}")
                break
            stage_start = time.perf_counter()
            engine = create_pair_engine(
                step,
                num_iterations,
                time_limit_s=remaining,
                patience=self.patience,
                tolerance=self.tolerance,
                progress=self.progress,
                description=f"stage {level + 1}/{len(self.levels)} ({'x'.join(map(str, level_shape))})",
            )
            engine.run(range(num_iterations), max_epochs=1)
            if best is not None:
                best.restore(model)
            stats.iterations.append(engine.state.iteration)
            stats.stage_time_s.append(time.perf_counter() - stage_start)
            stats.final_loss = engine.state.output["loss"] if best is None else best.loss

        if model is None:  # every stage skipped: the identity, or the initializer's displacement
            model_shape = flow_shapes[-1]
            model, _ = start_model(model_shape, None)
        stats.grid = list(model_shape)
        with torch.no_grad():
            displacement, _ = model()
            inverse = model.inverse() if isinstance(model, InvertibleModel) else invert_ddf(displacement)
            return RegistrationResult(resize_ddf(displacement, shape), stats, resize_ddf(inverse, shape))
