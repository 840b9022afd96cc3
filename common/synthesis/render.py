"""Deterministic rendering of MR-like images from FreeSurfer label maps.

Each label is given the mean intensity of its tissue class for the requested contrast plus a small seeded
per-label jitter, then the image is blurred (partial volume), multiplied by a smooth bias field and corrupted by
Rician noise. The result is a plausible, reproducible image for tests, the embedded sample and benchmarks; it does
not try to reproduce any scanner.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

__all__ = ["CLASS_MEANS", "CONTRASTS", "TISSUE_CLASSES", "render_contrast", "render_labels", "tissue_class"]

# FreeSurfer label values per tissue class (the labels SynthSeg segments, plus vessels, lesions, 5th ventricle
# and optic chiasm, which occur in its training label maps).
TISSUE_CLASSES: dict[str, tuple[int, ...]] = {
    "csf": (4, 5, 14, 15, 24, 43, 44, 72),
    "cortex": (3, 17, 18, 42, 53, 54),
    "cerebellar_cortex": (8, 47),
    "white_matter": (2, 7, 41, 46, 85),
    "striatum": (11, 12, 26, 50, 51, 58),
    "thalamus": (10, 49),
    "pallidum": (13, 52),
    "brainstem": (16, 28, 60),
    "vessel": (30, 62),
    "lesion": (25, 57),
}

CONTRASTS: tuple[str, ...] = ("t1", "t2", "flair", "pd")

# Mean intensity of each tissue class per contrast (columns as in CONTRASTS), on a [0, 1] scale before bias, noise
# and normalisation. T1: WM > deep GM > cortex > CSF. T2: CSF > cortex > WM. FLAIR: T2-like with dark CSF.
# PD: low contrast, CSF brightest, GM > WM.
CLASS_MEANS: dict[str, tuple[float, float, float, float]] = {
    "csf": (0.15, 0.95, 0.08, 0.85),
    "cortex": (0.50, 0.55, 0.60, 0.75),
    "cerebellar_cortex": (0.55, 0.55, 0.58, 0.74),
    "white_matter": (0.85, 0.35, 0.45, 0.62),
    "striatum": (0.60, 0.48, 0.55, 0.72),
    "thalamus": (0.70, 0.45, 0.52, 0.68),
    "pallidum": (0.75, 0.33, 0.45, 0.62),
    "brainstem": (0.78, 0.40, 0.50, 0.65),
    "vessel": (0.40, 0.10, 0.10, 0.20),
    "lesion": (0.45, 0.80, 0.90, 0.80),
}

_CLASS_OF_LABEL = {label: name for name, labels in TISSUE_CLASSES.items() for label in labels}


def tissue_class(label: int) -> str:
    """Tissue class of a FreeSurfer label value; labels outside :data:`TISSUE_CLASSES` count as ``"cortex"``."""
    return _CLASS_OF_LABEL.get(int(label), "cortex")


def _bias_field(shape: tuple[int, ...], strength: float, generator: torch.Generator) -> torch.Tensor:
    """Smooth positive field ``exp(b)``, ``b`` a 4x4x4 Gaussian control grid (std ``strength``) upsampled."""
    control = torch.randn((1, 1, 4, 4, 4), generator=generator) * strength
    return torch.exp(F.interpolate(control, size=shape, mode="trilinear", align_corners=True))[0, 0]


def render_labels(
    label_map: torch.Tensor,
    label_means: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    blur_sigma: float = 0.5,
    noise_std: float = 0.02,
    bias_strength: float = 0.1,
    background: float | None = None,
) -> torch.Tensor:
    """Render a label map ``[X, Y, Z]`` (integers, any device) whose labels have the given mean intensities.

    Args:
        label_map: integer label map, 0 = background.
        label_means: maps the sorted unique label values ``[L]`` to their mean intensities ``[L]`` (CPU tensors).
        generator: CPU generator of every random draw after ``label_means`` (bias field, noise).
        blur_sigma: standard deviation of the Gaussian partial-volume blur, in voxels (0 disables it).
        noise_std: standard deviation of the Rician noise, relative to the [0, 1] intensity scale.
        bias_strength: standard deviation of the log bias field at its control points.
        background: mean intensity of label 0, rendered like any tissue (SynthMorph); None keeps it exactly 0.

    Returns:
        ``[X, Y, Z]`` float32 image in [0, 1] on the label map's device.
    """
    device, shape = label_map.device, tuple(label_map.shape)
    values, index = torch.unique(label_map, return_inverse=True)
    means = label_means(values.cpu()).float().clamp_min(0.0)
    means[values.cpu() == 0] = 0.0 if background is None else background
    image = means.to(device)[index]
    foreground = (label_map > 0).float()

    if blur_sigma > 0:
        blur = GaussianFilter(spatial_dims=3, sigma=blur_sigma).to(device)
        image, foreground = blur(torch.stack([image, foreground])[:, None])[:, 0]
    image = image * _bias_field(shape, bias_strength, generator).to(device)
    noise = noise_std * torch.randn((2, *shape), generator=generator).to(device)
    # magnitude of a complex signal with Gaussian noise in both channels: Rician
    image = torch.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    if background is None:
        # zero outside the (blurred) label mask, where no partial-volume tissue remains
        image = torch.where(foreground > 0.05, image, torch.zeros_like(image))
    return (image / image.max().clamp_min(1e-6)).float()


def render_contrast(
    labels: np.ndarray | torch.Tensor,
    contrast: str,
    seed: int = 0,
    blur_sigma: float = 0.5,
    noise_std: float = 0.02,
    bias_strength: float = 0.1,
    jitter: float = 0.02,
) -> np.ndarray | torch.Tensor:
    """Render an MR-like image of ``contrast`` from a FreeSurfer label map (:func:`render_labels` with each label at its
    tissue class's mean for ``contrast`` plus a seeded jitter).

    Args:
        labels: ``[X, Y, Z]`` integer label map (FreeSurfer values, 0 = background).
        contrast: one of ``"t1"``, ``"t2"``, ``"flair"``, ``"pd"``.
        seed: seed of every random choice (per-label jitter, bias field, noise).
        blur_sigma, noise_std, bias_strength: as in :func:`render_labels`.
        jitter: standard deviation of the random offset added to each label's mean intensity.

    Returns:
        ``[X, Y, Z]`` float32 image in [0, 1] with background exactly 0: a numpy array for numpy input, otherwise a
        tensor on the device of ``labels``. The same inputs and seed always give the same image.
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}.")
    column = CONTRASTS.index(contrast)
    as_numpy = not isinstance(labels, torch.Tensor)
    label_map = torch.as_tensor(np.asarray(labels)) if as_numpy else labels
    if label_map.ndim != 3:
        raise ValueError(f"labels must be a 3D [X, Y, Z] map, got shape {tuple(label_map.shape)}.")
    label_map = label_map.round().long() if label_map.is_floating_point() else label_map.long()
    # random numbers are drawn on the CPU so that a seed gives the same image on every device
    generator = torch.Generator().manual_seed(seed)

    def class_means(values: torch.Tensor) -> torch.Tensor:
        means = torch.tensor([CLASS_MEANS[tissue_class(v)][column] for v in values.tolist()])
        return means + jitter * torch.randn(len(means), generator=generator)

    image = render_labels(label_map, class_means, generator, blur_sigma, noise_std, bias_strength)
    return image.cpu().numpy() if as_numpy else image
