from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.sample import sample_pair
from common.synthesis import CONTRASTS, render_contrast

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
