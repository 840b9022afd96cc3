"""Multi-axis (slice-wise) mutual information and the divergence regulariser: what a registration loss must do."""

from __future__ import annotations

import pytest
import torch
from monai.losses import GlobalMutualInformationLoss

from common.losses import (
    DisplacementDivergenceLoss,
    GlobalNormalizedCrossCorrelationLoss,
    MultiAxisMutualInformationLoss,
)
from common.spatial import identity_grid, warp
from common.synthesis import render_contrast

from .conftest import phantom_labels


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    labels = phantom_labels((32, 36, 30))
    t1 = torch.as_tensor(render_contrast(labels, "t1", seed=1))[None, None].clamp(0, 1)
    t2 = torch.as_tensor(render_contrast(labels, "t2", seed=2))[None, None].clamp(0, 1)
    return t1, t2


def test_aligned_images_score_far_above_a_shuffled_copy_and_a_misaligned_one():
    t1, t2 = _images()
    loss = MultiAxisMutualInformationLoss()
    shuffled = t1.flatten()[torch.randperm(t1.numel(), generator=torch.Generator().manual_seed(0))].view_as(t1)
    aligned = -loss(t1, t1)
    assert aligned > 0.5 and -loss(t1, shuffled) < 0.1 * aligned
    # across contrasts: the T1/T2 pair of one anatomy beats the same pair misaligned by 3 voxels
    assert -loss(t2, t1) > 1.2 * -loss(t2, torch.roll(t1, 3, dims=2))


def test_monotone_remap_barely_changes_it():
    t1, _ = _images()
    loss = MultiAxisMutualInformationLoss()
    same = -loss(t1, t1)
    for remapped in (t1**0.7, (t1 + 0.5 * t1**2) / 1.5):
        assert abs(-loss(t1, remapped) - same) < 0.05 * same


def test_an_intensity_relation_that_changes_between_slices_is_still_aligned():
    """Slices along Z each get their own histogram: inverting every other Z slice's contrast leaves the Z-slice MI
    unchanged, while one global histogram loses most of its information."""
    t1, _ = _images()
    flipped = t1.clone()
    flipped[..., ::2] = 1 - flipped[..., ::2]
    along_z = MultiAxisMutualInformationLoss(axes=(2,))
    assert abs(along_z(t1, flipped) - along_z(t1, t1)) < 1e-4
    global_mi = GlobalMutualInformationLoss(num_bins=8)
    assert -global_mi(t1, flipped) < 0.7 * -global_mi(t1, t1)


def test_gradient_moves_a_shifted_image_back():
    t1, t2 = _images()
    loss = MultiAxisMutualInformationLoss()
    shift = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=0.1)
    moving = warp(t1, torch.tensor([-2.0, 0.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, *t1.shape[2:]))
    for _ in range(60):
        optimizer.zero_grad()
        loss(warp(moving, shift.view(1, 3, 1, 1, 1).expand(1, 3, *t1.shape[2:])), t2).backward()
        optimizer.step()
    assert abs(shift[0].item() - 2) < 0.5 and shift[1:].abs().max() < 0.5


def test_bad_inputs_and_options_are_refused_and_dtype_is_kept():
    t1, t2 = _images()
    with pytest.raises(ValueError, match="one shape"):
        MultiAxisMutualInformationLoss()(t1, t2[..., :-1])
    with pytest.raises(ValueError, match="axes"):
        MultiAxisMutualInformationLoss(axes=(3,))
    value = MultiAxisMutualInformationLoss(reduction="none")(t1.double(), t2.double())
    assert value.shape == (1,) and value.dtype == torch.float64


def test_divergence_of_known_fields():
    grid = identity_grid((12, 14, 10), dtype=torch.float64)[None]  # voxel coordinates [1, 3, X, Y, Z]
    expansion = torch.zeros_like(grid)
    expansion[:, 0] = 0.1 * grid[:, 0]  # div u = 0.1 everywhere
    rotation = torch.stack([-grid[:, 1], grid[:, 0], torch.zeros_like(grid[:, 2])], 1) * 0.05  # div u = 0
    divergence = DisplacementDivergenceLoss()
    assert torch.isclose(divergence(expansion), torch.tensor(0.01, dtype=torch.float64))
    assert divergence(rotation) < 1e-12


@pytest.mark.parametrize(
    "loss", [MultiAxisMutualInformationLoss(num_bins=8), GlobalNormalizedCrossCorrelationLoss()], ids=["mi", "ncc"]
)
def test_a_masked_similarity_ignores_what_lies_outside_the_mask(loss):
    """A mask of ones changes nothing; with a mask, corrupting the voxels outside it leaves the value unchanged,
    while the unmasked value moves."""
    torch.manual_seed(0)
    fixed = torch.rand(1, 1, 16, 16, 16)
    warped = (fixed + 0.1 * torch.rand_like(fixed)).clamp(0, 1)
    mask = torch.zeros_like(fixed)
    mask[:, :, 3:13, 2:14, 4:12] = 1.0
    corrupted = warped.clone()
    corrupted[mask == 0] = torch.rand(int((mask == 0).sum()))
    torch.testing.assert_close(loss(warped, fixed, mask=torch.ones_like(fixed)), loss(warped, fixed))
    torch.testing.assert_close(loss(corrupted, fixed, mask=mask), loss(warped, fixed, mask=mask))
    assert abs(float(loss(corrupted, fixed) - loss(warped, fixed))) > 0.01
