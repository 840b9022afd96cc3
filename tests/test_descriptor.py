"""The learned descriptor's building blocks: Bézier contrast augmentation, InfoNCE, the network, the two views."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.losses import VoxelInfoNCELoss, mind_ssc, sample_voxels
from common.networks import DescriptorUNet, SelfSimilarityDescriptor, frozen
from common.networks.descriptor import _UnitNorm
from common.sample import sample_pair
from common.synthesis import render_contrast
from common.training import RandContrastViewsd, RandShiftedViewsd, corresponding_parts, retrieval_accuracy
from common.transforms import RandMonotoneBezier, RandMonotoneBezierd, ScaleIntensityRangePercentiles, bezier_remap

from .conftest import phantom_labels


def test_bezier_remap_is_monotone_keeps_the_range_and_changes_contrast():
    image = torch.rand(1, 12, 10, 9) * 300 - 50
    for seed in range(5):
        t = RandMonotoneBezier(prob=1.0)
        t.set_random_state(seed)
        out = t(image)
        order = image.flatten().argsort()
        assert (torch.diff(out.flatten()[order]) >= -1e-3).all()  # brighter stays brighter
        assert torch.isclose(out.min(), image.min()) and torch.isclose(out.max(), image.max(), rtol=1e-4)
        assert (out - image).abs().max() > 1.0
    identity = bezier_remap(image, torch.tensor([[1 / 3, 1 / 3], [2 / 3, 2 / 3]]))
    assert torch.allclose(identity, image, atol=1e-2)  # collinear control points: the identity curve


@pytest.mark.parametrize("relative", [False, True])
def test_percentile_scaling_is_monais_with_its_metadata(relative):
    """The registrations' intensity scaling finds both percentiles in one selection; the result, its type and its
    affine must be MONAI's transform's, on an image above and one below the size where MONAI leaves the CPU's sort."""
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRangePercentiles as Monais

    args = {"lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": not relative, "relative": relative}
    for shape in [(1, 9, 10, 11), (1, 104, 104, 104)]:
        image = MetaTensor(torch.rand(*shape) ** 3 * 900 - 20, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
        ours, expected = ScaleIntensityRangePercentiles(**args)(image), Monais(**args)(image)
        assert isinstance(ours, MetaTensor) and torch.equal(ours.affine, image.affine)
        assert ours.dtype == expected.dtype and torch.allclose(ours, expected, atol=1e-6)


def test_bezier_dictionary_version_remaps_exactly_one_view():
    image = torch.rand(1, 8, 8, 8)
    t = RandMonotoneBezierd(["a", "b"], prob=1.0)
    changed = set()
    for seed in range(8):
        t.set_random_state(seed)
        out = t({"a": image, "b": image.clone()})
        diff = {k for k in ("a", "b") if not torch.equal(out[k], image)}
        assert diff == {t.chosen}
        changed |= diff
    assert changed == {"a", "b"}
    t = RandMonotoneBezierd(["a", "b"], prob=0.0)
    out = t({"a": image, "b": image})
    assert torch.equal(out["a"], image) and torch.equal(out["b"], image)


def test_infonce_is_low_for_matching_descriptors_and_high_for_unrelated_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 24, 10, 10, 10, generator=g)
    loss = VoxelInfoNCELoss(temperature=0.05, num_samples=256)
    matched = loss(a, a + 0.05 * torch.randn(a.shape, generator=g))
    unrelated = loss(a, torch.randn(a.shape, generator=g))
    assert matched < 0.1 and unrelated > 4.0  # log(256) = 5.5 at chance
    b = a.clone().requires_grad_()
    loss(b, a).backward()
    assert b.grad.abs().sum() > 0


def test_infonce_draws_only_inside_the_mask():
    a = torch.randn(1, 4, 6, 6, 6)
    mask = torch.zeros(1, 1, 6, 6, 6)
    mask[..., :2, :, :] = 1
    index = sample_voxels(a.shape, 500, mask)
    assert index.shape == (1, 72) and bool(mask.flatten()[index[0]].all())


def test_multichannel_self_similarity_reduces_to_mind_for_repeated_channels():
    image = torch.rand(1, 1, 14, 12, 13)
    assert torch.allclose(mind_ssc(image.expand(1, 5, -1, -1, -1)), mind_ssc(image), atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 24, 24), (21, 26, 19)])
def test_descriptor_network_gives_24_unit_channels_at_input_resolution(shape):
    net = SelfSimilarityDescriptor(DescriptorUNet(channels=(8, 16, 16, 32), out_channels=8))
    out = net(torch.rand(2, 1, *shape))
    assert out.shape == (2, 24, *shape)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, *shape), atol=1e-5)


def test_descriptor_unit_norm_has_the_gradient_of_the_plain_formula():
    tokens = torch.rand(2, 6, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 6, 4, 5, 3, dtype=torch.float64)
    (ours,) = torch.autograd.grad((_UnitNorm.apply(tokens) * weights).sum(), tokens)
    (plain,) = torch.autograd.grad((torch.nn.functional.normalize(tokens, dim=1) * weights).sum(), tokens)
    assert torch.allclose(ours, plain, atol=1e-12)
    assert torch.autograd.gradcheck(_UnitNorm.apply, (tokens,))
    # inference (and the zoo's TorchScript export) takes plain operations to the same descriptor
    net, image = SelfSimilarityDescriptor(DescriptorUNet()), torch.rand(1, 1, 12, 14, 10)
    with torch.no_grad():
        plain = net(image)
    assert torch.allclose(net(image), plain, atol=1e-6)


def test_descriptor_of_one_image_and_its_gradient_do_not_depend_on_the_batch_it_is_described_in():
    torch.manual_seed(0)
    net = frozen(SelfSimilarityDescriptor(DescriptorUNet()))
    image, other = torch.rand(1, 1, 20, 22, 18, requires_grad=True), torch.rand(1, 1, 20, 22, 18)
    alone = net(image)
    (grad_alone,) = torch.autograd.grad(alone.square().mean(), image)
    batched = net(torch.cat([image, other]))[:1]
    (grad_batched,) = torch.autograd.grad(batched.square().mean(), image)
    assert torch.allclose(alone, batched, atol=1e-5)
    assert torch.allclose(grad_alone, grad_batched, atol=1e-7)


def test_contrast_views_share_anatomy_but_not_intensities():
    labels = phantom_labels((20, 22, 18))[None]
    t = RandContrastViewsd()
    t.set_random_state(3)
    out = t({"label": labels})
    a, b, mask = out["view_a"], out["view_b"], out["mask"]
    assert "label" not in out and a.shape == b.shape == mask.shape == (1, 20, 22, 18)
    assert torch.equal(mask, (labels > 0).float())
    assert (a - b).abs().mean() > 0.05  # two different contrasts
    fixed = RandContrastViewsd(fixed_contrasts=("t1", "t2"), seed_offset=7)
    assert torch.equal(fixed({"label": labels})["view_a"], fixed({"label": labels})["view_a"])


def test_shifted_views_come_from_different_places_and_their_corresponding_parts_show_the_same_voxels():
    image = torch.rand(1, 30, 28, 26)
    t = RandShiftedViewsd(max_shift=6)
    t.set_random_state(0)
    items = [t({"view_a": image, "view_b": image.clone(), "mask": (image > 0.3).float()}) for _ in range(8)]
    assert all(item["view_a"].shape == item["view_b"].shape == (1, 24, 22, 20) for item in items)
    offsets = torch.stack([item["offset"] for item in items])
    assert (offsets != 0).any(dim=1).all() and offsets.abs().max() <= 6  # never co-located here, within range
    batch = {k: torch.stack([item[k] for item in items]) for k in ("view_a", "view_b", "mask")}
    for a, b, mask in corresponding_parts(batch["view_a"], batch["view_b"], batch["mask"], offsets):
        assert a.shape == b.shape == mask.shape and torch.equal(a, b) and torch.equal(mask, (a > 0.3).float())
    fixed = RandShiftedViewsd(max_shift=4, fixed=True)({"view_a": image, "view_b": image, "mask": image})
    assert fixed["offset"].tolist() == [-4, -4, -4]
    with pytest.raises(ValueError, match="too small"):
        RandShiftedViewsd(max_shift=30)({"view_a": image, "view_b": image, "mask": image})


def test_retrieval_accuracy_is_one_for_identical_maps_and_chance_for_noise():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 24, 12, 12, 12, generator=g)
    assert retrieval_accuracy(a, a, num_samples=512) == 1.0
    assert retrieval_accuracy(a, torch.randn(a.shape, generator=g), num_samples=512) < 0.05


def test_shipped_descriptor_matches_held_out_anatomy_across_contrasts_far_better_than_an_untrained_one():
    """The trained weights of ``node_contrastive`` on T1-like vs T2-like renderings of the sample's fixed label map,
    a subject kept out of training (2 mm, while training saw 1 mm crops), the two views cut 6 voxels apart along
    each axis so that position within the image cannot stand in for anatomy."""
    weights = Path(__file__).resolve().parents[1] / "bundles" / "node_contrastive" / "models" / "descriptor.pt"
    labels = torch.from_numpy(np.asanyarray(nib.load(sample_pair()["fixed_label"]).dataobj).astype(np.int64))
    views = RandShiftedViewsd(max_shift=6, fixed=True)(
        {
            "view_a": render_contrast(labels, "t1", seed=11)[None],
            "view_b": render_contrast(labels, "t2", seed=12)[None],
            "mask": (labels > 0).float()[None],
        }
    )

    def accuracy(weights_path: str | None) -> float:
        torch.manual_seed(0)
        net = frozen(SelfSimilarityDescriptor(DescriptorUNet(channels=(8, 16, 16, 32), out_channels=8)), weights_path)
        with torch.no_grad():
            a, b = net(views["view_a"][None].float()), net(views["view_b"][None].float())
        parts = corresponding_parts(a, b, views["mask"][None], views["offset"][None])
        torch.manual_seed(1)
        return retrieval_accuracy(*parts[0][:2], num_samples=1024, mask=parts[0][2])

    trained, untrained = accuracy(str(weights)), accuracy(None)
    # measured with the shipped weights: 0.82 trained (0.1.0: 0.67), 0.011 untrained (chance: 1/1024)
    assert trained > 0.5 and trained > 20 * untrained, (trained, untrained)


def test_mind_floor_flattens_noise_in_flat_tissue_and_keeps_edges():
    """A variance floor relative to the image's mean local variance turns the descriptor of flat, noisy tissue towards
    1 (no structure) while a strong edge keeps its contrast; the floor must be a fraction."""
    from common.losses import MINDSSC

    torch.manual_seed(0)
    image = torch.zeros(1, 1, 24, 24, 24)
    image[..., 12:] = 1.0
    image = image + 0.01 * torch.randn_like(image)
    flat, edge = (slice(None), slice(None), slice(4, 20), slice(4, 20), slice(2, 7)), (..., slice(10, 14))
    low, high = mind_ssc(image), mind_ssc(image, floor=0.3)
    assert high[flat].std() < 0.5 * low[flat].std() and high[flat].mean() > low[flat].mean()
    assert high[edge].std() > 0.5 * low[edge].std()
    with pytest.raises(ValueError, match="floor"):
        MINDSSC(floor=1.5)
