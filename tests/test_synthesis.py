from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.sample import sample_pair
from common.spatial import jacobian_determinant
from common.spatial.fields import warp
from common.synthesis import CONTRASTS, LabelToContrastd, RandLabelToImaged, render_contrast
from common.transforms import ComposeDisplacementd, RandDiffeomorphicWarpd

CSF, WM, GM = 4, 2, 3


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """24^3 nested spheres: CSF core, white matter, cortex, background."""
    radius = np.linalg.norm(np.indices((24, 24, 24)) - 11.5, axis=0)
    labels = np.zeros((24, 24, 24), np.int16)
    labels[radius < 10] = GM
    labels[radius < 7] = WM
    labels[radius < 3] = CSF
    return labels


def tissue_means(image: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    return {label: float(image[labels == label].mean()) for label in (CSF, WM, GM)}


def test_same_seed_same_image(phantom):
    first = render_contrast(phantom, "t1", seed=3)
    assert first.dtype == np.float32 and first.shape == phantom.shape
    np.testing.assert_array_equal(first, render_contrast(phantom, "t1", seed=3))
    assert not np.array_equal(first, render_contrast(phantom, "t1", seed=4))


def test_range_and_background(phantom):
    image = render_contrast(phantom, "t2", seed=0)
    assert image.min() >= 0.0 and image.max() == pytest.approx(1.0)
    assert np.all(image[0] == 0) and np.all(image[:, :, -1] == 0)


@pytest.mark.parametrize(
    "contrast, order",
    [("t1", (WM, GM, CSF)), ("t2", (CSF, GM, WM)), ("flair", (GM, WM, CSF)), ("pd", (CSF, GM, WM))],
)
def test_tissue_ordering(phantom, contrast, order):
    means = tissue_means(render_contrast(phantom, contrast, seed=1), phantom)
    assert means[order[0]] > means[order[1]] > means[order[2]]


def test_contrasts_differ(phantom):
    images = [render_contrast(phantom, contrast, seed=1) for contrast in CONTRASTS]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j])[phantom > 0].mean() > 0.02


def test_torch_input_matches_numpy(phantom):
    image = render_contrast(torch.as_tensor(phantom), "flair", seed=2)
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    np.testing.assert_allclose(image.numpy(), render_contrast(phantom, "flair", seed=2), atol=1e-6)


def test_bad_arguments(phantom):
    with pytest.raises(ValueError, match="contrast"):
        render_contrast(phantom, "ct")
    with pytest.raises(ValueError, match="3D"):
        render_contrast(phantom[None], "t1")


def world_box(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (np.array(image.shape) - 1)
    world = nib.affines.apply_affine(image.affine, corners)
    return world.min(0), world.max(0)


def test_sample_files():
    paths = sample_pair()
    assert set(paths) == {"fixed", "moving", "fixed_label", "moving_label"}
    images = {}
    for key, path in paths.items():
        assert Path(path).is_absolute() and Path(path).is_file()
        images[key] = nib.load(path)
        assert images[key].ndim == 3
        np.testing.assert_allclose(images[key].header.get_zooms(), (2.0, 2.0, 2.0))
    assert nib.aff2axcodes(images["moving"].affine) == ("R", "A", "S")
    assert nib.aff2axcodes(images["fixed"].affine) == ("L", "I", "A")
    for role in ("fixed", "moving"):
        label = images[f"{role}_label"]
        assert label.shape == images[role].shape
        np.testing.assert_allclose(label.affine, images[role].affine)
        assert np.issubdtype(label.get_data_dtype(), np.integer)
    (fixed_lo, fixed_hi), (moving_lo, moving_hi) = world_box(images["fixed"]), world_box(images["moving"])
    overlap = np.minimum(fixed_hi, moving_hi) - np.maximum(fixed_lo, moving_lo)
    assert np.all(overlap > 0.8 * (fixed_hi - fixed_lo))


@pytest.mark.parametrize("role, brighter, darker", [("moving", WM, GM), ("fixed", GM, WM)])
def test_sample_contrast(role, brighter, darker):
    paths = sample_pair()
    image = np.asanyarray(nib.load(paths[role]).dataobj)
    labels = np.asanyarray(nib.load(paths[f"{role}_label"]).dataobj)
    assert image[labels == brighter].mean() > image[labels == darker].mean()


def _deform(seed: int, prob: float = 1.0, **data) -> dict:
    transform = RandDiffeomorphicWarpd(
        list(data),
        mode=["bilinear" if v.is_floating_point() else "nearest" for v in data.values()],
        prob=prob,
        velocity_std=3.0,
        control_spacing=8.0,
        ddf_key="ddf",
    )
    return transform.set_random_state(seed)(data)


def test_random_diffeomorphic_warp_is_invertible_reproducible_and_large(phantom):
    labels = torch.as_tensor(phantom)[None]
    first, again, other = (_deform(seed, label=labels)["ddf"] for seed in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.abs().amax() > 1.5  # voxels: a deformation worth registering
    assert (jacobian_determinant(first[None]) > 0).all()


def test_a_known_field_follows_its_fixed_image_when_that_is_deformed_again():
    """The fixed image is the moving one pulled back by ``v``; deformed once more by ``u``, the composed field
    ``u + v(x + u)`` still maps the moving image onto it (to interpolation), while ``v`` alone no longer does."""
    radius = torch.linalg.vector_norm(
        torch.stack(torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij")) - 11.5, dim=0
    )
    moving = torch.exp(-((radius / 6) ** 2))[None]  # smooth, so that interpolation errors stay small
    v = _deform(4, image=moving)["ddf"]
    again = _deform(5, image=warp(moving[None], v[None])[0])
    composed = ComposeDisplacementd("target", ddf_key="ddf")({"target": v, "ddf": again["ddf"]})["target"]

    def error(field: torch.Tensor) -> float:
        return float((warp(moving[None], field[None])[0] - again["image"]).abs().mean())

    assert error(composed) < 0.1 * error(v) and error(v) < error(torch.zeros_like(v))
    with pytest.raises(ValueError, match="shape"):
        ComposeDisplacementd("target", ddf_key="ddf")({"target": v[:, :8], "ddf": again["ddf"]})


def test_random_diffeomorphic_warp_moves_labels_with_their_image(phantom):
    def piecewise_constant(labels: np.ndarray) -> np.ndarray:
        return render_contrast(labels, "t1", seed=0, blur_sigma=0, noise_std=0, bias_strength=0)

    labels = torch.as_tensor(phantom)[None]
    out = _deform(3, image=torch.as_tensor(piecewise_constant(phantom))[None], label=labels)
    assert out["label"].dtype == labels.dtype and not torch.equal(out["label"], labels)
    # re-rendering the warped labels gives the warped image where a voxel's neighbours share its label (measured:
    # 99.8 % of those voxels to 1e-4; the rest sample across an edge that nearest neighbour puts on the other side)
    rendered = torch.as_tensor(piecewise_constant(out["label"][0].numpy()))
    warped = out["label"][None].float()
    interior = F.max_pool3d(warped, 3, 1, 1) == -F.max_pool3d(-warped, 3, 1, 1)
    gap = (out["image"][0] - rendered).abs()[interior[0, 0]]
    assert (gap < 1e-4).float().mean() > 0.99
    # without the draw, nothing moves
    unchanged = _deform(3, prob=0.0, label=labels)
    assert torch.equal(unchanged["label"], labels) and unchanged["ddf"].abs().max() == 0


def _foreground_label_means(image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean intensity of each label value ``[max label + 1]`` over the foreground (0 for absent values)."""
    mask = labels > 0
    lab = labels[mask]
    return torch.zeros(int(lab.max()) + 1).index_add_(0, lab, image[mask]) / torch.bincount(lab).clamp_min(1)


def _label_variance_share(image: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the foreground intensity variance explained by the label map (1: each label one intensity)."""
    mask = labels > 0
    x, lab = image[mask], labels[mask]
    return float(1 - (x - _foreground_label_means(image, labels)[lab]).var() / x.var())


def test_random_contrast_images_follow_their_labels_and_vary_between_draws():
    labels = torch.as_tensor(np.asarray(nib.load(sample_pair()["moving_label"]).dataobj)).long()[None]
    transform = RandLabelToImaged(["a", "b"], ["image_a", "image_b"], prior_prob=0.0)
    out = transform.set_random_state(0)({"a": labels, "b": labels})
    again = transform.set_random_state(0)({"a": labels, "b": labels})
    assert torch.equal(out["image_a"], again["image_a"]) and out["image_a"].shape == labels.shape
    outside = F.max_pool3d((labels > 0).float()[None], 9, 1, 4)[0] == 0  # beyond any blur
    assert out["image_a"].min() >= 0 and out["image_a"].max() <= 1 and (out["image_a"][outside] == 0).all()
    # each key has its own contrast
    assert (out["image_a"] - out["image_b"]).abs()[labels > 0].mean() > 0.05
    # over draws, the image stays explained by its own labels despite blur, bias and noise (median share 0.79),
    # far more than by the labels 3 voxels off (0.29); and any contrast appears (WM brighter than cortex, or darker)
    shares, brighter = [], []
    for seed in range(12):
        image = transform.set_random_state(seed)({"a": labels, "b": labels})["image_a"]
        shares.append(_label_variance_share(image, labels) - _label_variance_share(image, torch.roll(labels, 3, 1)))
        brighter.append(bool(image[labels == WM].mean() > image[labels == GM].mean()))
    assert np.median(shares) > 0.3, shares
    assert 0 < sum(brighter) < len(brighter)


def test_a_same_contrast_draw_gives_every_label_one_mean_in_both_images(phantom):
    """A same-contrast pair (the easy pairs of a training curriculum): each label has the same mean intensity in both
    images, over several draws; by default the two images' contrasts differ."""
    labels = torch.as_tensor(phantom).long()[None]
    present = torch.bincount(labels[labels > 0]) > 0

    def gap(transform: RandLabelToImaged, seed: int) -> float:
        out = transform.set_random_state(seed)({"a": labels, "b": labels.clone()})
        a, b = (_foreground_label_means(out[k], labels) for k in ("image_a", "image_b"))
        return float((a - b)[present].abs().max())

    # only the contrast draw left random, so that the images differ by their contrasts alone
    fixed_look = dict(prior_prob=0.0, max_blur=0.0, max_bias=0.0, max_noise=0.0, max_slice_factor=1.0, gamma_std=0.0)
    same = RandLabelToImaged(["a", "b"], ["image_a", "image_b"], **fixed_look, same_contrast_prob=1.0)
    own = RandLabelToImaged(["a", "b"], ["image_a", "image_b"], **fixed_look)
    assert max(gap(same, seed) for seed in range(6)) < 1e-5
    assert min(gap(own, seed) for seed in range(6)) > 0.1


def test_random_background_is_rendered_like_a_tissue_when_asked(phantom):
    """SynthMorph renders the background like any label, so that shrinking the moving image's background pays off
    less in MI than against a zero background; by default it stays exactly 0 (skull-stripped images)."""
    labels = torch.as_tensor(phantom)[None]
    outside = torch.as_tensor(phantom == 0)
    transform = RandLabelToImaged(["a"], ["image"], prior_prob=0.0, max_noise=0.0, background_prob=1.0)
    levels = [float(transform.set_random_state(seed)({"a": labels})["image"][0][outside].mean()) for seed in range(8)]
    assert min(levels) > 0 and max(levels) - min(levels) > 0.3, levels
    default = RandLabelToImaged(["a"], ["image"], prior_prob=0.0).set_random_state(0)({"a": labels})["image"][0]
    corner = F.max_pool3d((labels > 0).float()[None], 9, 1, 4)[0, 0] == 0
    assert (default[corner] == 0).all()


def test_label_to_contrast_renders_each_key_in_its_named_contrast_every_time(phantom):
    """The validation pairs of the registration training: a T1-like moving and a T2-like fixed image, the same on
    every call (a validation metric must not vary with random draws)."""
    labels = torch.as_tensor(phantom)[None]
    transform = LabelToContrastd(["moving_label", "fixed_label"], ["moving", "fixed"], ["t1", "t2"], seed=5)
    out = transform({"moving_label": labels, "fixed_label": labels.clone()})
    again = transform({"moving_label": labels, "fixed_label": labels.clone()})
    assert torch.equal(out["moving"], again["moving"]) and torch.equal(out["fixed"], again["fixed"])
    assert out["moving"].shape == (1, 24, 24, 24)
    t1, t2 = (tissue_means(out[k][0].numpy(), phantom) for k in ("moving", "fixed"))
    assert t1[WM] > t1[GM] > t1[CSF] and t2[CSF] > t2[GM] > t2[WM]
    np.testing.assert_array_equal(out["fixed"][0].numpy(), render_contrast(phantom, "t2", seed=6))
    with pytest.raises(ValueError, match="one image key and one contrast"):
        LabelToContrastd(["a", "b"], ["x"], ["t1", "t2"])
    mixed = LabelToContrastd("fixed_label", "fixed", contrast_key="contrast", seed=6)
    for contrast in ("t2", "pd"):
        image = mixed({"fixed_label": labels, "contrast": contrast})["fixed"][0].numpy()
        np.testing.assert_array_equal(image, render_contrast(phantom, contrast, seed=6))
    with pytest.raises(ValueError, match="either contrasts"):
        LabelToContrastd("a", "x", ["t1"], contrast_key="contrast")


def test_t1_only_prior_draws_give_t1_like_images_that_still_vary(phantom):
    """``prior_contrasts=("t1",)`` with ``prior_prob`` 1 (the mono-modal backbone's training pairs): white matter
    always brighter than cortex and CSF darkest, yet two draws of one map differ (jitter, bias, noise, gamma)."""
    labels = torch.as_tensor(phantom).long()[None]
    transform = RandLabelToImaged(["a"], ["image"], prior_prob=1.0, prior_contrasts=("t1",))
    images = [transform.set_random_state(seed)({"a": labels})["image"] for seed in range(6)]
    for image in images:
        assert image[labels == WM].mean() > image[labels == GM].mean()
    assert (images[0] - images[1]).abs()[labels > 0].mean() > 0.01
    with pytest.raises(ValueError, match="prior_contrasts"):
        RandLabelToImaged(["a"], ["image"], prior_contrasts=("t3",))
