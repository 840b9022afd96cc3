"""Local mutual information: what a registration user relies on (alignment peaks, contrast invariance, gradients)."""

from __future__ import annotations

import torch

from common.engine import InstanceOptimizationInferer, PatchSimilarity
from common.losses import LocalMutualInformationLoss, grouped_mutual_information, patch_groups
from common.spatial import warp
from common.synthesis import render_contrast

from .conftest import phantom_labels


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    labels = phantom_labels((32, 36, 30))
    t1 = torch.as_tensor(render_contrast(labels, "t1", seed=1))[None, None]
    t2 = torch.as_tensor(render_contrast(labels, "t2", seed=2))[None, None]
    return t1, t2


def test_lmi_is_highest_for_aligned_images_and_near_zero_for_a_shuffled_copy():
    t1, _ = _images()
    loss = LocalMutualInformationLoss(patch_size=6)
    shuffled = t1.flatten()[torch.randperm(t1.numel(), generator=torch.Generator().manual_seed(0))].view_as(t1)
    aligned, mixed = -loss(t1, t1), -loss(t1, shuffled)
    assert aligned > 0.4 and mixed < 0.15 * aligned


def test_lmi_is_nearly_invariant_to_a_monotone_remap_and_sees_across_contrasts():
    t1, t2 = _images()
    loss = LocalMutualInformationLoss(patch_size=6, overlap=0.5)
    x = t1.clamp(0, 1)
    same = -loss(t1, t1)
    for remapped in (x**0.7, (x + 0.5 * x**2) / 1.5):  # monotone, non-linear, onto [0, 1]
        assert abs(-loss(t1, remapped) - same) < 0.05 * same
    # an inverted contrast (T1 vs T2 of one anatomy) scores far above the same pair misaligned by 3 voxels
    assert -loss(t2, t1) > 1.2 * -loss(t2, torch.roll(t1, 3, dims=2))


def test_lmi_gradient_moves_a_shifted_image_back():
    t1, t2 = _images()
    loss = LocalMutualInformationLoss(patch_size=5)
    shift = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=0.1)
    # moving(x) = t1(x - 2 e_x), so warped(x) = moving(x + s) matches the fixed T2 when s = 2 e_x
    moving = warp(t1, torch.tensor([-2.0, 0.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, *t1.shape[2:]))
    for _ in range(60):
        optimizer.zero_grad()
        ddf = shift.view(1, 3, 1, 1, 1).expand(1, 3, *t1.shape[2:])
        loss(warp(moving, ddf).clamp(0, 1), t2).backward()
        optimizer.step()
    assert abs(shift[0].item() - 2) < 0.5 and shift[1:].abs().max() < 0.5


def test_patch_samples_give_the_same_value_as_the_volume():
    t1, t2 = _images()
    loss = LocalMutualInformationLoss(patch_size=4, reduction="none")
    groups_a, groups_b = patch_groups(t1, 4, 4), patch_groups(t2, 4, 4)
    flat = loss(groups_a.flatten(2), groups_b.flatten(2))
    assert torch.allclose(loss(t1, t2), flat, atol=1e-6)
    assert torch.allclose(-flat, grouped_mutual_information(groups_a[:, 0], groups_b[:, 0]), atol=1e-6)


def test_inferer_draws_whole_patches_for_a_patch_similarity():
    similarity = LocalMutualInformationLoss(patch_size=3)
    assert isinstance(similarity, PatchSimilarity) and not isinstance(torch.nn.MSELoss(), PatchSimilarity)
    inferer = InstanceOptimizationInferer(lambda shape: None, None, similarity, sample_points=270)
    points = inferer._random_points((10, 12, 9), torch.device("cpu")).view(-1, 27, 3)
    assert points.shape[0] == 10 and int(points.max()) <= 11 and int(points.min()) >= 0
    spans = points.amax(1) - points.amin(1)
    assert torch.equal(spans, torch.full_like(spans, 2))  # each group is one 3x3x3 block


def test_lmi_follows_device_and_dtype():
    t1, t2 = _images()
    value = LocalMutualInformationLoss()(t1.double(), t2.double())
    assert value.dtype == torch.float64 and value.device == t1.device
    assert torch.isfinite(value)
