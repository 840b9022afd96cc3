"""Test-time optimisation of a registration network and the pair loss it optimises."""

from __future__ import annotations

import pytest
import torch

from common.engine import TestTimeOptimizationInferer, working_shape
from common.losses import (
    MINDSSC,
    DescriptorSimilarity,
    DisplacementDivergenceLoss,
    DisplacementSmoothnessLoss,
    EndPointErrorLoss,
    GlobalNormalizedCrossCorrelationLoss,
    ImageSimilarity,
    MultiAxisMutualInformationLoss,
    RegistrationObjective,
    TeacherDistillationLoss,
    WarpedLabelDiceLoss,
)
from common.metrics import dice_per_label, mean_dict
from common.networks import DisplacementUNet
from common.spatial import jacobian_determinant, warp
from common.synthesis import render_contrast

from .conftest import phantom_labels, smooth_field


def _small_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return DisplacementUNet((8, 8, 8, 8, 8, 8), unet_out_channels=8, final_conv_channels=(8,))  # near the identity


def test_amp_is_a_switch_or_auto_and_auto_follows_the_hardware(monkeypatch):
    from common.engine import native_bfloat16

    loss = _objective(ncc=1.0)
    with pytest.raises(ValueError, match="amp must be"):
        TestTimeOptimizationInferer(_small_unet(), loss, amp="bf16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False})
    assert not native_bfloat16(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert native_bfloat16(torch.device("cpu"))


def test_working_grid_is_a_multiple_of_16_at_the_requested_voxel_size():
    assert working_shape((160, 192, 144), (1.0, 1.0, 1.0), None, 16) == (160, 192, 144)
    assert working_shape((161, 190, 7), (1.0, 1.0, 1.0), None, 16) == (176, 192, 16)
    assert working_shape((160, 192, 144), (1.0, 1.0, 1.2), 2.0, 16) == (80, 96, 96)


def test_tto_registers_a_pair_and_leaves_the_network_unchanged():
    labels = phantom_labels((30, 34, 28))
    truth = smooth_field(labels.shape, amplitude=3.0, seed=4)
    moving_labels = warp(labels[None, None].float(), truth, mode="nearest")[0, 0].long()
    # one contrast, two noise draws: the paper's time-series use, with its NCC term
    fixed = torch.as_tensor(render_contrast(labels, "t1", seed=1))[None, None]
    moving = torch.as_tensor(render_contrast(moving_labels, "t1", seed=2))[None, None]
    net = _small_unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    loss = _objective(image_sigma=1.0, ncc=1.0, smoothness=1.0)
    inferer = TestTimeOptimizationInferer(
        net, loss, iterations=60, time_budget_s=None, learning_rate=1e-3, progress=False
    )
    result = inferer(fixed, moving, spacing=(1.0, 1.0, 1.0))
    ddf = result.ddf
    assert ddf.shape == (1, 3, 30, 34, 28) and result.stats.grid == [32, 48, 32]
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    inside = (result.inverse_ddf + warp(ddf, result.inverse_ddf)).norm(dim=1)[0][labels > 0]
    assert inside.mean() < 0.1, inside.mean()  # the fixed-point inverse undoes the field

    warped = warp(moving_labels[None, None].float(), ddf, mode="nearest")[0, 0].long()
    dice_before = mean_dict(dice_per_label(moving_labels, labels))
    dice_after = mean_dict(dice_per_label(warped, labels))
    assert dice_after > dice_before + 0.05, (dice_before, dice_after)  # measured: 0.847 -> 0.927
    assert (jacobian_determinant(ddf) > 0).float().mean() > 0.999
    # without iterations the network's own (near-identity) output comes back
    untuned = TestTimeOptimizationInferer(net, loss, iterations=0, progress=False)(fixed, moving, (1.0, 1.0, 1.0))
    assert untuned.ddf.abs().max() < 0.01 and untuned.stats.iterations == [0]


def _objective(image_sigma: float = 0.0, **weights: float) -> RegistrationObjective:
    """The terms TTO-KD uses, weighted as given (0 for the others)."""
    terms = {
        "mi": ImageSimilarity(MultiAxisMutualInformationLoss(num_bins=8)),
        "ncc": ImageSimilarity(GlobalNormalizedCrossCorrelationLoss()),
        "smoothness": DisplacementSmoothnessLoss(),
        "divergence": DisplacementDivergenceLoss(),
        "distillation": TeacherDistillationLoss(MultiAxisMutualInformationLoss(num_bins=8)),
        "label": WarpedLabelDiceLoss(),
        "field": EndPointErrorLoss(),
    }
    return RegistrationObjective(terms, {name: weights.get(name, 0.0) for name in terms}, image_sigma=image_sigma)


def test_objective_prefers_the_aligning_field_and_distils_from_a_teacher():
    labels = phantom_labels((30, 34, 28))
    fixed = torch.as_tensor(render_contrast(labels, "t2", seed=1))[None, None]
    moving = torch.roll(torch.as_tensor(render_contrast(labels, "t1", seed=2))[None, None], 2, dims=2)
    aligning = torch.zeros(1, 3, 30, 34, 28)
    aligning[:, 0] = 2.0  # moving(x + 2 e_x) = t1(x): the pair aligned
    pair = {"fixed": fixed, "moving": moving}
    loss = _objective(image_sigma=1.0, mi=1.0, smoothness=1.0, divergence=1.0)
    assert loss(ddf=aligning, **pair) < loss(ddf=torch.zeros_like(aligning), **pair) - 0.05
    assert set(loss.values) == {"mi", "smoothness", "divergence"}
    # the distillation term scores a student by how closely it warps like the teacher
    student = _objective(distillation=1.0)
    assert student(ddf=aligning, teacher_ddf=aligning, **pair) < student(ddf=0 * aligning, teacher_ddf=aligning, **pair)
    with pytest.raises(ValueError, match="teacher_ddf"):
        student(ddf=aligning, **pair)
    # the label term (SynthMorph's supervision of synthetic pairs) is zero for the aligning field, whatever the values
    anatomical = _objective(label=1.0)
    labels_ = {"fixed_label": torch.as_tensor(labels)[None, None].long()}
    labels_["moving_label"] = torch.roll(labels_["fixed_label"], 2, dims=2)
    assert anatomical(ddf=aligning, **pair, **labels_) < 1e-4
    assert anatomical(ddf=torch.zeros_like(aligning), **pair, **labels_) > 0.1
    with pytest.raises(ValueError, match="fixed_label, moving_label"):
        anatomical(ddf=aligning, **pair)
    # the field term is the mean end-point error against a known displacement, in voxels
    supervised = _objective(field=1.0)
    assert supervised(ddf=aligning, target_ddf=aligning) < 1e-2
    assert supervised(ddf=torch.zeros_like(aligning), target_ddf=aligning) == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(ValueError, match="target_ddf"):
        supervised(ddf=aligning, **pair)
    with pytest.raises(ValueError, match="non-zero"):
        _objective()
    with pytest.raises(ValueError, match="one weight per term"):
        RegistrationObjective({"smoothness": DisplacementSmoothnessLoss()}, {"mi": 1.0})
    with pytest.raises(TypeError, match="inputs"):
        RegistrationObjective({"mse": torch.nn.MSELoss()}, {"mse": 1.0})


def test_descriptor_similarity_prefers_the_aligning_field_across_contrasts_and_reads_only_the_mask():
    labels = phantom_labels((30, 34, 28))
    fixed = torch.as_tensor(render_contrast(labels, "t2", seed=1))[None, None]
    moving = torch.roll(torch.as_tensor(render_contrast(labels, "t1", seed=2))[None, None], 2, dims=2)
    aligning = torch.zeros(1, 3, 30, 34, 28)
    aligning[:, 0] = 2.0
    term = DescriptorSimilarity(MINDSSC())
    at_truth, at_zero = term(aligning, moving, fixed), term(torch.zeros_like(aligning), moving, fixed)
    assert at_truth < 0.6 * at_zero, (at_truth, at_zero)
    # a gradient reaches the field and points towards the aligning shift (+x) where the images overlap
    ddf = torch.zeros_like(aligning, requires_grad=True)
    term(ddf, moving, fixed).backward()
    assert -ddf.grad[0, 0][labels > 0].sum() > 0
    # with a mask, voxels outside it do not count: scrambling them changes nothing
    mask = torch.zeros(1, 1, 30, 34, 28)
    mask[..., 8:22, 8:26, 8:20] = 1.0
    scrambled = fixed.clone()
    scrambled[mask == 0] = torch.rand(int((mask == 0).sum()))
    inside = term(aligning, moving, fixed, mask=mask)
    # the descriptor reaches 3 voxels, so compare inside a mask shrunk by that much
    core = torch.zeros_like(mask)
    core[..., 11:19, 11:23, 11:17] = 1.0
    assert term(aligning, moving, scrambled, mask=core) == pytest.approx(
        term(aligning, moving, fixed, mask=core).item()
    )
    assert inside != pytest.approx(term(aligning, moving, fixed).item())
    # descriptors are reused only while the same image is unchanged
    changed = fixed.clone()
    before = term(aligning, moving, changed)
    changed.copy_(torch.roll(fixed, 3, dims=3))  # in place: the anatomy moved
    assert term(aligning, moving, changed) != pytest.approx(before.item())


def test_global_ncc_is_minus_one_for_an_affine_copy_and_near_zero_for_noise():
    generator = torch.Generator().manual_seed(0)
    image, noise = torch.rand(2, 2, 1, 20, 24, 16, generator=generator)
    ncc = GlobalNormalizedCrossCorrelationLoss(reduction="none")
    assert torch.allclose(ncc(3 * image + 1, image), torch.tensor([-1.0, -1.0]), atol=1e-5)
    assert ncc(image, noise).abs().max() < 0.05
    assert ncc(image.double(), image.double()).dtype == torch.float64
