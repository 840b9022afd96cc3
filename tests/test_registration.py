"""Per-pair optimisation with the node_mind model: known deformations recovered, identity kept, engine controls."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common.engine import AnatomyGate, BestState, CoupledConvexInitializer, InstanceOptimizationInferer, PairAdam
from common.losses import (
    MINDSSC,
    DisplacementSmoothnessLoss,
    EngineTerm,
    JacobianBarrierLoss,
    RegistrationObjective,
    VelocityMagnitudeLoss,
)
from common.metrics import dice_per_label, mean_dict
from common.ode import NeuralODEFlow, VelocityNet
from common.smoothing import RKHSSmoother
from common.spatial import jacobian_determinant, warp
from common.synthesis import render_contrast

from .conftest import invert_field, phantom_labels, smooth_field

NETWORK = functools.partial(
    NeuralODEFlow, num_steps=8, velocity_net=functools.partial(VelocityNet, upsample_steps=0, smoother=RKHSSmoother())
)


def _inferer(**overrides) -> InstanceOptimizationInferer:
    options = dict(
        model_factory=NETWORK,
        objective=RegistrationObjective(
            {
                "similarity": EngineTerm(),
                "jacobian": JacobianBarrierLoss(0.5),
                "smoothness": DisplacementSmoothnessLoss(),
                "magnitude": VelocityMagnitudeLoss(),
            },
            {"similarity": 1.0, "jacobian": 2.5, "smoothness": 0.05, "magnitude": 5e-5},
        ),
        similarity=torch.nn.MSELoss(),
        descriptor=MINDSSC(radius=1, dilation=1),
        warp_descriptor=True,
        levels=(1,),
        iterations=(80,),
        learning_rate=5e-3,
        flow_downsample=2.0,
        progress=False,
    )
    options.update(overrides)
    return InstanceOptimizationInferer(**options)


class MaxChannelGap(torch.nn.Module):
    """A "similarity" returning the largest channel difference at each voxel, to compare descriptors value by value."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred - target).abs().amax(dim=1)


def _moving_and_inner_field() -> tuple[torch.Tensor, torch.Tensor]:
    """A T1-like phantom ``[1, 1, *S]`` and a smooth displacement of up to 3 voxels that vanishes within 6 voxels of the
    border, where padding conventions differ."""
    moving = torch.as_tensor(render_contrast(phantom_labels(), "t1", seed=2))[None, None].float()
    window = torch.zeros(1, 1, *moving.shape[2:])
    window[..., 6:-6, 6:-6, 6:-6] = 1.0
    return moving, smooth_field(moving.shape[2:], amplitude=3.0, seed=5) * window


def test_known_deformation_is_recovered_across_contrasts():
    labels = phantom_labels()
    truth = smooth_field(labels.shape, amplitude=5.0, seed=3)  # moving = fixed anatomy pulled by ``truth``
    moving_labels = warp(labels[None, None].float(), truth, mode="nearest")[0, 0].long()
    fixed = torch.as_tensor(render_contrast(labels, "t2", seed=1))[None, None]
    moving = torch.as_tensor(render_contrast(moving_labels, "t1", seed=2))[None, None]

    inferer = _inferer(levels=(2, 1), iterations=(60, 60))
    ddf = inferer(fixed, moving, spacing=(1.0, 1.0, 1.0)).ddf

    warped_labels = warp(moving_labels[None, None].float(), ddf, mode="nearest")[0, 0].long()
    dice_before = mean_dict(dice_per_label(moving_labels, labels))
    dice_after = mean_dict(dice_per_label(warped_labels, labels))
    # the exact answer: fixed(x) = moving(x + u(x)) holds for u = truth^-1
    expected = invert_field(truth)
    brain = (labels > 0)[None, None].expand_as(ddf)
    error_before = expected[brain].abs().mean()
    error_after = (ddf - expected)[brain].abs().mean()
    assert dice_after > dice_before + 0.2, (dice_before, dice_after)  # measured: 0.65 -> 0.93
    assert error_after < 0.6 * error_before, (error_before, error_after)  # measured: 0.80 -> 0.39 voxel
    assert (jacobian_determinant(ddf) > 0).all()


def _cross_contrast_pair(amplitude: float) -> tuple[torch.Tensor, ...]:
    """T2-like fixed and T1-like moving phantoms ``[1, 1, *S]``, the moving labels, and the field that aligns them."""
    labels = phantom_labels()
    truth = smooth_field(labels.shape, amplitude=amplitude, seed=3)
    moving_labels = warp(labels[None, None].float(), truth, mode="nearest")[0, 0].long()
    fixed = torch.as_tensor(render_contrast(labels, "t2", seed=1))[None, None].float()
    moving = torch.as_tensor(render_contrast(moving_labels, "t1", seed=2))[None, None].float()
    return fixed, moving, moving_labels, invert_field(truth)


def test_the_convex_start_recovers_most_of_a_known_deformation_across_contrasts():
    fixed, moving, _, expected = _cross_contrast_pair(amplitude=5.0)
    start = CoupledConvexInitializer(MINDSSC(radius=1, dilation=1), cell_mm=3.0, search_mm=6.0, step_mm=1.0)
    ddf = start(fixed, moving, spacing=(1.0, 1.0, 1.0))
    brain = (phantom_labels() > 0)[None, None].expand_as(ddf)
    error_before, error_after = expected[brain].abs().mean(), (ddf - expected)[brain].abs().mean()
    assert ddf.shape == expected.shape and error_after < 0.6 * error_before, (
        error_before,
        error_after,
    )  # measured: 0.80 -> 0.47 voxel
    with pytest.raises(ValueError, match="increasing"):
        CoupledConvexInitializer(MINDSSC(), coupling=(0.1, 0.01))


def test_the_convex_start_reads_cell_averages_on_its_search_grid_as_a_sliding_box_gives_them():
    """The shortcut for steps of whole cells: averages computed at the search points alone equal the stride-1 box
    filter read there (the last voxel standing for the points past it), whatever the cell sides."""
    from common.engine.convex import _cell_averages

    field, sides = torch.rand(1, 4, 11, 13, 9, generator=torch.Generator().manual_seed(0)), (3, 2, 4)
    padded = F.pad(field, [p for side in reversed(sides) for p in (side // 2, (side - 1) // 2)], mode="replicate")
    sliding = F.avg_pool3d(padded, sides, stride=1)
    positions = [list(range(0, n, side)) + ([n - 1] if (n - 1) % side else []) for n, side in zip((11, 13, 9), sides)]
    expected = sliding[:, :, positions[0]][:, :, :, positions[1]][..., positions[2]]
    torch.testing.assert_close(_cell_averages(field, sides, positions), expected)


def test_a_flow_started_from_a_displacement_gives_it_back_and_its_exact_inverse():
    field = smooth_field((24, 28, 20), amplitude=3.0, seed=4)
    flow = NETWORK(shape=(24, 28, 20))
    flow.start_from(field)
    displacement, _ = flow()
    inverse = flow.inverse()
    assert (displacement - field).norm(dim=1).mean() < 0.05 * field.norm(dim=1).mean()
    assert (inverse + warp(displacement, inverse)).norm(dim=1).mean() < 0.05


def test_starting_from_the_convex_search_aligns_better_in_the_same_iterations():
    """What the start is for: fewer iterations to the same alignment (measured after 5: Dice 0.65 before, 0.77 from
    the identity, 0.91 from the convex start)."""
    fixed, moving, moving_labels, _ = _cross_contrast_pair(amplitude=5.0)
    start = CoupledConvexInitializer(MINDSSC(radius=1, dilation=1), cell_mm=3.0, search_mm=6.0, step_mm=1.0)
    dice = {}
    for name, initializer in (("identity", None), ("convex", start)):
        result = _inferer(iterations=(5,), initializer=initializer)(fixed, moving, spacing=(1.0, 1.0, 1.0))
        warped = warp(moving_labels[None, None].float(), result.ddf, mode="nearest")[0, 0].long()
        dice[name] = mean_dict(dice_per_label(warped, phantom_labels()))
    assert dice["convex"] > dice["identity"] + 0.08, dice
    assert "initializer_s" in result.stats.decisions


def test_a_stage_on_a_coarser_flow_grid_hands_its_displacement_to_the_next():
    """A cheap first stage on a coarse flow grid, then a model on the finer grid started where it ended: the
    alignment is kept across the change of grid and refined (measured: Dice 0.65 -> 0.77 after the coarse stage alone,
    0.91 after both)."""
    fixed, moving, moving_labels, _ = _cross_contrast_pair(amplitude=5.0)
    dice = {}
    for iterations in ((40, 0), (40, 30)):
        inferer = _inferer(levels=(2, 1), iterations=iterations, flow_downsample=(4, 2))
        result = inferer(fixed, moving, spacing=(1.0, 1.0, 1.0))
        warped = warp(moving_labels[None, None].float(), result.ddf, mode="nearest")[0, 0].long()
        dice[iterations] = mean_dict(dice_per_label(warped, phantom_labels()))
    assert result.stats.grid == [18, 20, 17]  # the finer flow grid ends the registration
    assert dice[(40, 30)] > dice[(40, 0)] + 0.05 and dice[(40, 0)] > 0.72, dice
    # factors match stages from the finest back: one stage takes the finest factor, three repeat the coarsest
    assert _inferer(levels=(1,), iterations=(1,), flow_downsample=(4, 2)).flow_downsample == [2.0]
    assert _inferer(levels=(4, 2, 1), iterations=(1, 1, 1), flow_downsample=(4, 2)).flow_downsample == [4.0, 4.0, 2.0]
    with pytest.raises(ValueError, match="positive"):
        _inferer(flow_downsample=(4, 0))


def test_identical_images_give_the_identity_field():
    image = torch.as_tensor(render_contrast(phantom_labels(), "t1", seed=0))[None, None]
    ddf = _inferer(iterations=(40,))(image, image.clone(), spacing=(1.0, 1.0, 1.0)).ddf
    assert ddf.abs().max() < 0.1


def test_time_budget_and_convergence_stop_early():
    image = torch.as_tensor(render_contrast(phantom_labels(), "t1", seed=0))[None, None]
    shifted = torch.roll(image, 1, dims=2)
    budget = _inferer(iterations=(10_000,), time_budget_s=2.0)
    assert 0 < budget(image, shifted, spacing=(1.0, 1.0, 1.0)).stats.iterations[0] < 10_000
    converged = _inferer(iterations=(2_000,), patience=10, tolerance=1e-2)
    assert 10 < converged(image, shifted, spacing=(1.0, 1.0, 1.0)).stats.iterations[0] < 2_000


def test_each_stage_warps_or_recomputes_the_moving_descriptor_as_told():
    """``warp_descriptor=(True, False)``: the first stage describes the moving image once and warps that, the second
    describes the warped moving image at every iteration; the pair still gets registered."""
    fixed = torch.as_tensor(render_contrast(phantom_labels(), "t1", seed=0))[None, None]
    moving = torch.roll(fixed, 2, dims=2)

    class Counted(MINDSSC):
        calls = 0

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return super().forward(image)

    descriptor = Counted(radius=1, dilation=1)
    inferer = _inferer(descriptor=descriptor, levels=(1, 1), iterations=(30, 10), warp_descriptor=(True, False))
    ddf = inferer(fixed, moving, spacing=(1.0, 1.0, 1.0)).ddf
    assert descriptor.calls == (1 + 1) + (1 + 10)  # fixed and moving once, then fixed once and one per iteration
    assert ddf[0, 0].mean() > 1.0, ddf[0, 0].mean()


def test_with_amp_a_learned_descriptor_runs_in_bfloat16_and_the_pair_is_still_registered():
    """``amp=True``: the descriptor's convolutions run in bfloat16, what the optimisation sees stays float32, and a
    shift is recovered as in float32."""
    fixed = torch.as_tensor(render_contrast(phantom_labels(), "t1", seed=0))[None, None]
    moving = torch.roll(fixed, 2, dims=2)

    class Recorded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.dtypes = torch.nn.Conv3d(1, 4, 3, padding=1), set()

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            out = self.conv(image)
            self.dtypes.add(out.dtype)
            return out

    shifts = {}
    for amp, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        descriptor = Recorded()
        ddf = _inferer(descriptor=descriptor, warp_descriptor=False, iterations=(40,), amp=amp)(
            fixed, moving, spacing=(1.0, 1.0, 1.0)
        ).ddf
        assert descriptor.dtypes == {dtype}
        assert ddf.dtype == torch.float32
        shifts[amp] = ddf[0, 0].mean().item()
    assert shifts[True] > 1.0, shifts
    assert abs(shifts[True] - shifts[False]) < 0.2, shifts
    # MIND-SSC has no convolution for autocast to lower: node_mind's default amp="auto" changes nothing there
    mind = [_inferer(iterations=(20,), amp=amp)(fixed, moving, spacing=(1.0, 1.0, 1.0)).ddf for amp in (True, False)]
    assert torch.equal(mind[0], mind[1])
    with pytest.raises(ValueError, match="amp must be"):
        _inferer(amp="bf16")


def test_best_state_restores_the_lowest_loss_parameters():
    module = torch.nn.Linear(2, 1)
    best = BestState()
    for value, loss in [(1.0, 3.0), (2.0, 1.0), (3.0, 2.0)]:
        torch.nn.init.constant_(module.weight, value)
        best.update(loss, module)
    best.restore(module)
    assert best.loss == 1.0 and torch.all(module.weight == 2.0)


def test_a_stage_on_random_voxels_keeps_its_last_state_not_its_luckiest_draw():
    """The lowest loss on random voxels marks a lucky draw: restoring its parameters would undo the stage's work."""
    fixed = torch.as_tensor(render_contrast(phantom_labels(), "t1", seed=0))[None, None]
    moving = torch.roll(fixed, 2, dims=2)  # fixed(x) = moving(x + 2) along the first axis

    class LuckyDraw(torch.nn.MSELoss):
        calls = 0

        def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return super().forward(pred, target) - (1.0 if self.calls == 2 else 0.0)

    inferer = _inferer(similarity=LuckyDraw(), sample_points=20_000, iterations=(60,))
    assert inferer.is_sampled(fixed.shape[2:], warp_descriptor=True)
    result = inferer(fixed, moving, spacing=(1.0, 1.0, 1.0))
    ddf = result.ddf
    assert ddf[0, 0].mean() > 1.0, ddf[0, 0].mean()  # restoring the lucky second iteration: 0.11 voxel
    assert result.stats.final_loss > 0


def test_levels_and_iterations_must_match():
    with pytest.raises(ValueError, match="same length"):
        _inferer(levels=(2, 1), iterations=(10,))
    with pytest.raises(ValueError, match="one flag per level"):
        _inferer(levels=(2, 1), iterations=(10, 10), warp_descriptor=(True,))
    with pytest.raises(ValueError, match="'factor' or 'mm'"):
        _inferer(levels=(2, 1), iterations=(10, 10), levels_unit="voxels")
    with pytest.raises(ValueError, match="must not be negative"):
        _inferer(levels=(2, 1), iterations=(10, -1))


def test_levels_in_mm_put_each_stage_at_the_same_voxel_size_whatever_the_image():
    """``(2, 1)`` mm: a 1 mm image's first stage runs at 2 mm, a 2 mm image's at its own grid (factors would take it
    to 4 mm), and an anisotropic image is never made finer along its thick axis."""
    in_mm = _inferer(levels=(2, 1), iterations=(1, 1), levels_unit="mm")
    factors = _inferer(levels=(2, 1), iterations=(1, 1))
    assert [in_mm.level_shape((160, 192, 144), (1.0,) * 3, grid) for grid in in_mm.levels] == [
        (80, 96, 72),
        (160, 192, 144),
    ]
    assert [in_mm.level_shape((80, 96, 72), (2.0,) * 3, grid) for grid in in_mm.levels] == [(80, 96, 72)] * 2
    assert factors.level_shape((80, 96, 72), (2.0,) * 3, factors.levels[0]) == (40, 48, 36)
    assert in_mm.level_shape((160, 192, 48), (1.0, 1.0, 3.0), 2.0) == (80, 96, 48)

    seen = []
    descriptor = MINDSSC(radius=1, dilation=1)
    descriptor.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    image = torch.as_tensor(render_contrast(phantom_labels(), "t1", seed=0))[None, None]
    _inferer(descriptor=descriptor, levels=(2, 1), iterations=(2, 2), levels_unit="mm")(
        image, image.clone(), spacing=(2.0,) * 3
    )
    assert set(seen) == {tuple(image.shape[2:])}


def test_a_stage_repeating_the_one_before_is_skipped_so_a_1mm_schedule_costs_a_coarser_image_nothing():
    """``(2, 2, 1)`` mm with the last two stages recomputed: a 1 mm image runs all three stages, a 2 mm image skips the
    1 mm stage, which would repeat the second on its grid, and gets exactly the result of ``(2, 2)``."""
    image = torch.as_tensor(render_contrast(phantom_labels(), "t1", seed=0))[None, None].float()
    moving = torch.roll(image, shifts=1, dims=2)
    schedule = dict(levels_unit="mm", warp_descriptor=(True, False, False))

    fine = _inferer(levels=(2, 2, 1), iterations=(2, 3, 4), **schedule)
    assert fine(image, moving, spacing=(1.0,) * 3).stats.iterations == [2, 3, 4]

    coarse = _inferer(levels=(2, 2, 1), iterations=(2, 3, 4), **schedule)
    skipped = coarse(image, moving, spacing=(2.0,) * 3)
    assert skipped.stats.iterations == [2, 3, 0]
    two_stages = _inferer(levels=(2, 2), iterations=(2, 3), levels_unit="mm", warp_descriptor=(True, False))
    torch.testing.assert_close(skipped.ddf, two_stages(image, moving, spacing=(2.0,) * 3).ddf, rtol=0, atol=0)
    # a stage given no iterations is skipped too, and does not make the next one a repeat
    no_first = _inferer(levels=(2, 2), iterations=(0, 3), levels_unit="mm", warp_descriptor=(True, False))
    assert no_first(image, moving, spacing=(2.0,) * 3).stats.iterations == [0, 3]


def test_recomputed_descriptor_in_random_blocks_equals_the_descriptor_of_the_whole_warped_image():
    """With ``warp_descriptor`` False and sampling, each random block's MIND comes from the warped moving image on the
    block grown by the descriptor's reach: the values the whole warped image's MIND has at those voxels, except where
    MIND's variance floor (relative to the mean over the block, not the image) applies, in nearly flat regions."""
    moving, ddf = _moving_and_inner_field()
    shape = moving.shape[2:]
    descriptor = MINDSSC(radius=1, dilation=2)
    whole = descriptor(warp(moving, ddf))

    # 16 blocks of 8^3 voxels, grown by the reach of 3 to 14^3: 44 000 of the image's 49 000 voxels
    inferer = _inferer(
        similarity=MaxChannelGap(),
        descriptor=descriptor,
        warp_descriptor=False,
        sample_points=16 * 8**3,
        sample_block=8,
    )
    torch.manual_seed(0)
    # the fixed descriptor is the whole warped image's, so any difference is the block computation's
    gap = inferer._similarity(ddf, moving, whole, warp_descriptor=False)
    assert gap.shape == (1, 16 * 8**3) and (gap < 1e-4).float().mean() > 0.93 and gap.mean() < 0.01
    assert (
        inferer._similarity(torch.zeros_like(ddf), moving, whole, warp_descriptor=False) < 1e-4
    ).float().mean() < 0.8
    # more blocks than that would cost more than the whole image: the whole warped image is described
    inferer.sample_points = 20 * 8**3
    assert inferer._similarity(ddf, moving, whole, warp_descriptor=False).shape == (1, *shape)
    # and without sample_points, every voxel
    inferer.sample_points = None
    assert inferer._similarity(ddf, moving, whole, warp_descriptor=False).shape == (1, *shape)


def test_warped_descriptor_at_random_voxels_equals_the_whole_warped_descriptor_there():
    """With ``warp_descriptor`` and sampling, the moving descriptor (12 channels, stored channels-last as a stage
    keeps it) sampled at random voxels through the displacement has the values of the whole warped descriptor."""
    moving, ddf = _moving_and_inner_field()
    shape = moving.shape[2:]
    source = MINDSSC(radius=1, dilation=2)(moving)
    whole = warp(source, ddf)

    inferer = _inferer(similarity=MaxChannelGap(), sample_points=5000)
    assert inferer.is_sampled(shape, warp_descriptor=True)
    torch.manual_seed(0)
    gap = inferer._similarity(ddf, source.contiguous(memory_format=torch.channels_last_3d), whole, warp_descriptor=True)
    assert gap.shape == (1, 5000) and gap.max() < 1e-4, gap.max()
    assert inferer._similarity(torch.zeros_like(ddf), source, whole, warp_descriptor=True).mean() > 0.01


def test_the_inverse_undoes_the_registration():
    """The result's inverse (the flow of -v) composed with the field is the identity within 0.1 voxel (mean) inside the
    phantom; measured: mean 0.03, 95th percentile 0.06 voxel (fields up to 2.2 voxels)."""
    labels = phantom_labels()
    truth = smooth_field(labels.shape, amplitude=4.0, seed=3)
    moving = warp(torch.as_tensor(render_contrast(labels, "t1", seed=2))[None, None].float(), truth)
    fixed = torch.as_tensor(render_contrast(labels, "t2", seed=1))[None, None]
    result = _inferer(iterations=(60,))(fixed, moving, spacing=(1.0, 1.0, 1.0))
    ddf, inverse = result.ddf, result.inverse_ddf
    assert inverse is not None and inverse.shape == ddf.shape and ddf.abs().max() > 1.0
    residual = (inverse + warp(ddf, inverse)).norm(dim=1)[0]  # y + w(y) + u(y + w(y)) - y
    inside = residual[labels > 0]
    assert inside.mean() < 0.1 and torch.quantile(inside, 0.95) < 0.3, (inside.mean(), torch.quantile(inside, 0.95))


def _head(shape: tuple[int, int, int], brain_only: bool = False) -> torch.Tensor:
    """A head phantom ``[1, X, Y, Z]``: textured brain labels inside a bright scalp shell (none when ``brain_only``)."""
    labels = phantom_labels(shape)
    image = render_contrast(labels.numpy(), "t1", seed=0)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = grid.square().sum(0).sqrt()
    scalp = (radius > 0.9) & (radius < 1.0) & (labels == 0)
    head = torch.as_tensor(image) + 0.8 * scalp
    return (torch.as_tensor(image) if brain_only else head)[None].float()


def test_the_affine_stage_leaves_a_skull_stripped_brain_within_its_head_and_refuses_implausible_scaling():
    """``auto``: a skull-stripped copy of a head (half its volume, wholly inside it) is aligned although their Dice is
    low, so the stage does not run. With ``max_scale``, a result scaling a direction by more than the bound gives way to
    the rigid stage's map (a copy scaled by 12 %, bound 1.05: the map kept scales by at most 1 %)."""
    from common.engine import AffineRegistration

    shape, eye = (40, 44, 40), torch.eye(4, dtype=torch.float64) * 2
    eye[3, 3] = 1
    head, brain = _head(shape), _head(shape, brain_only=True)
    skipped = AffineRegistration(iterations=(20, 10))(head, brain, eye, eye)
    assert not skipped.ran and "skull-stripped" in skipped.reason and skipped.overlap < 0.9

    scaled = eye.clone()
    scaled[:3, :3] *= 1.12
    scaled[:3, 3] = -0.12 * 2 * (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    free = AffineRegistration(mode="true", iterations=(40, 20))(head, head, eye, scaled)
    bounded = AffineRegistration(mode="true", iterations=(40, 20), max_scale=1.05)(head, head, eye, scaled)
    free_scales = torch.linalg.svdvals(free.matrix[:3, :3])
    assert free_scales.max() > 1.06, free.matrix
    assert "implausible" in bounded.reason and torch.linalg.svdvals(bounded.matrix[:3, :3]).max() < 1.01
    with pytest.raises(ValueError, match="max_scale"):
        AffineRegistration(max_scale=0.9)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_pair_adam_steps_as_torch_adam(amsgrad):
    """The per-pair optimiser takes torch.optim.Adam's steps (with its linear warm-up as a LambdaLR would), on
    tensors that get a gradient at some steps only."""
    torch.manual_seed(0)
    start = [torch.randn(40, 3), torch.randn(7)]
    ours = [t.clone().requires_grad_(True) for t in start]
    theirs = [t.clone().requires_grad_(True) for t in start]
    optimizer = PairAdam(ours, lr=0.05, amsgrad=amsgrad, warmup=3)
    reference = torch.optim.Adam(theirs, lr=0.05, amsgrad=amsgrad)
    schedule = torch.optim.lr_scheduler.LambdaLR(reference, lambda i: min(1.0, (i + 1) / 3))
    for k in range(6):
        for params, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            loss = (params[0].sin() ** 2).sum() + (params[1] ** 3).sum() * (k % 2)  # the second: every other step
            loss.backward()
            opt.step()
        schedule.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lr > 0"):
        PairAdam(ours, lr=0.0)


def test_pair_adam_does_not_import_dynamo():
    """A registration's optimiser does not cost the process PyTorch's compiler import (0.6-1.1 s on a CPU)."""
    code = (
        "import sys, torch\n"
        "from common.engine import PairAdam\n"
        "p = torch.zeros(5, requires_grad=True)\n"
        "o = PairAdam([p], lr=0.1, amsgrad=True)\n"
        "p.sum().backward(); o.step()\n"
        "assert p[0] < 0 and 'torch._dynamo' not in sys.modules, sorted(m for m in sys.modules if 'dynamo' in m)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _same_anatomy_inferer(**overrides) -> InstanceOptimizationInferer:
    """:func:`_inferer` with the anatomy gate and a same-anatomy objective 40 times as smooth."""
    plain = _inferer()
    strong = RegistrationObjective(
        dict(plain.objective.terms), {"similarity": 1.0, "jacobian": 2.5, "smoothness": 2.0, "magnitude": 5e-4}
    )
    return _inferer(anatomy_gate=AnatomyGate(**overrides), same_anatomy_objective=strong)


def test_scans_of_one_anatomy_get_the_same_anatomy_objective_and_two_subjects_the_default():
    """The anatomy gate finds a T2/T1 pair of one phantom to be one anatomy, and the inferer registers it with the
    same-anatomy objective: its answer is the identity, and it moves less than under the objective for two
    subjects. A pair of two anatomies (the moving phantom deformed by up to 8 voxels) is registered exactly as
    without the gate. The decision and the NMI are in the stats; a gate without its objective is refused."""
    labels = phantom_labels()
    fixed = torch.as_tensor(render_contrast(labels, "t2", seed=1))[None, None].float()
    moving = torch.as_tensor(render_contrast(labels, "t1", seed=2))[None, None].float()
    brain = (labels > 0)[None, None].expand(1, 3, *labels.shape)
    gated, plain = _same_anatomy_inferer(), _inferer()
    one = gated(fixed, moving, (1.0, 1.0, 1.0))
    assert one.stats.decisions["same_anatomy"] is True and one.stats.decisions["anatomy_nmi"] >= 0.16
    moved, moved_plain = (r.ddf[brain].abs().mean() for r in (one, plain(fixed, moving, (1.0, 1.0, 1.0))))
    assert moved < 0.75 * moved_plain, (moved, moved_plain)  # measured: 0.088 against 0.136 voxel

    other_labels = warp(labels[None, None].float(), smooth_field(labels.shape, 8.0, seed=3), mode="nearest")[0, 0]
    other = torch.as_tensor(render_contrast(other_labels.long(), "t1", seed=2))[None, None].float()
    two = gated(fixed, other, (1.0, 1.0, 1.0))
    assert two.stats.decisions["same_anatomy"] is False
    torch.testing.assert_close(two.ddf, plain(fixed, other, (1.0, 1.0, 1.0)).ddf)
    with pytest.raises(ValueError, match="go together"):
        _inferer(anatomy_gate=AnatomyGate())


def test_the_anatomy_gate_tells_one_subjects_real_scans_from_two_subjects(shared_data):
    """On real templates in one space: the SPM12 average T1 against the average T2 and PD of the same brains is one
    anatomy; a single subject's T1 against those averages is not, in either contrast."""
    import nibabel as nib

    folder = shared_data / "templates" / "spm12"

    def image(name: str) -> torch.Tensor:
        return torch.as_tensor(nib.load(folder / f"canonical_{name}.nii.gz").get_fdata(), dtype=torch.float32)[
            None, None
        ]

    gate = AnatomyGate()
    for fixed, moving, expected in (
        ("avg152T1", "avg152T2", True),
        ("avg152T1", "avg152PD", True),
        ("single_subj_T1", "avg152T2", False),
        ("single_subj_T1", "avg152PD", False),
    ):
        one_anatomy, nmi = gate(image(fixed), image(moving))
        assert one_anatomy is expected, (fixed, moving, nmi)
    with pytest.raises(ValueError, match="auto, always or never"):
        AnatomyGate(mode="sometimes")
