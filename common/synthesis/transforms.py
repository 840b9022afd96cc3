"""Random-contrast images rendered from label maps on the fly (SynthMorph-style training pairs)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import convert_to_tensor, ensure_tuple

from .render import CLASS_MEANS, CONTRASTS, render_contrast, render_labels, tissue_class

__all__ = ["LabelToContrastd", "RandLabelToImaged"]

# the mean intensity of any label values [L] (CPU tensors), and the background level (None: exactly 0)
Contrast = tuple[Callable[[torch.Tensor], torch.Tensor], float | None]


class RandLabelToImaged(RandomizableTransform, MapTransform):
    """Render an image of a random contrast from each label map in ``keys``, each key with its own draw of contrast
    (or, with probability ``same_contrast_prob``, one draw of contrast shared by all keys).

    A draw gives every tissue class (``group_labels``; else every label) a mean intensity uniform in ``[0, 1]``, plus a
    per-label jitter, so that any contrast can appear, as in SynthMorph; with probability ``prior_prob`` the class
    means of a real contrast (:data:`common.synthesis.CLASS_MEANS`, chosen at random) are used instead. Then a
    partial-volume blur, a bias field, Rician noise (:func:`common.synthesis.render_labels`), a random loss of
    resolution along one axis, and a random gamma. The images stay on the label maps' device.

    Args:
        keys: label maps ``[1, X, Y, Z]`` (FreeSurfer values, 0 = background).
        image_keys: where to write each key's image ``[1, X, Y, Z]`` (float32 in ``[0, 1]``).
        group_labels: labels of one tissue class share a mean, so that structures keep their anatomical grouping.
        jitter: standard deviation of the per-label offset from its class mean.
        prior_prob: probability of a real contrast's class means.
        prior_contrasts: the real contrasts drawn from (names in :data:`common.synthesis.CONTRASTS`); ``("t1",)`` with
            ``prior_prob`` 1 gives T1-like images that still vary in jitter, blur, bias, noise and gamma.
        max_blur: upper bound of the blur's standard deviation (voxels), drawn uniformly from 0.
        max_bias: upper bound of the bias field's log-amplitude.
        max_noise: upper bound of the noise standard deviation.
        max_slice_factor: upper bound of the factor by which one random axis loses resolution (1: never).
        gamma_std: standard deviation of the log of the gamma exponent.
        background_prob: probability that a draw renders the background as a tissue of uniform random mean intensity
            (SynthMorph), else it stays 0.
        same_contrast_prob: probability that all keys share one draw of label means and background (a same-contrast
            pair, the easy pairs of a training curriculum); blur, bias, noise, resolution and gamma stay per key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_keys: KeysCollection,
        group_labels: bool = True,
        jitter: float = 0.05,
        prior_prob: float = 0.5,
        prior_contrasts: Sequence[str] = CONTRASTS,
        max_blur: float = 1.0,
        max_bias: float = 0.3,
        max_noise: float = 0.05,
        max_slice_factor: float = 3.0,
        gamma_std: float = 0.25,
        background_prob: float = 0.0,
        same_contrast_prob: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.image_keys = ensure_tuple(image_keys)
        if len(self.image_keys) != len(self.keys):
            raise ValueError(f"one image key per label key: got {len(self.image_keys)} for {len(self.keys)}.")
        self.group_labels, self.jitter, self.prior_prob = group_labels, jitter, prior_prob
        unknown = sorted(set(prior_contrasts) - set(CONTRASTS))
        if unknown or not prior_contrasts:
            raise ValueError(f"prior_contrasts must be some of {CONTRASTS}, got {tuple(prior_contrasts)}.")
        self.prior_columns = [CONTRASTS.index(c) for c in prior_contrasts]
        self.max_blur, self.max_bias, self.max_noise = max_blur, max_bias, max_noise
        self.max_slice_factor, self.gamma_std, self.background_prob = max_slice_factor, gamma_std, background_prob
        self.same_contrast_prob = same_contrast_prob

    def _contrast(self) -> Contrast:
        """A draw of contrast; a label value gets the same mean whatever map it comes from."""
        classes = sorted(CLASS_MEANS)
        if self.R.uniform() < self.prior_prob:
            column = self.prior_columns[int(self.R.randint(len(self.prior_columns)))]
            class_mean = {name: CLASS_MEANS[name][column] for name in classes}
        else:
            class_mean = dict(zip(classes, self.R.uniform(size=len(classes)).tolist()))
        seed = int(self.R.randint(2**31))
        random_background = self.background_prob > 0 and self.R.uniform() < self.background_prob
        background = float(self.R.uniform()) if random_background else None

        def means(values: torch.Tensor) -> torch.Tensor:
            # draws indexed by label value, not by rank, so that every map of the draw gets the same means
            generator, size, index = torch.Generator().manual_seed(seed), int(values.max()) + 1, values.long()
            jitter = self.jitter * torch.randn(size, generator=generator)[index]
            if self.group_labels:
                base = torch.tensor([class_mean[tissue_class(v)] for v in values.tolist()])
            else:
                base = torch.rand(size, generator=generator)[index]
            return (base + jitter).clamp(0, 1)

        return means, background

    def _render(self, labels: torch.Tensor, contrast: Contrast) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(self.R.randint(2**31)))
        label_map = labels[0].round().long() if labels.is_floating_point() else labels[0].long()
        blur, bias, noise = (float(self.R.uniform(0, m)) for m in (self.max_blur, self.max_bias, self.max_noise))
        means, background = contrast
        image = render_labels(label_map, means, generator, blur, noise, bias, background)[None]
        factor = float(self.R.uniform(1, self.max_slice_factor))
        if factor > 1.05:
            axis, shape = int(self.R.randint(3)), list(image.shape[1:])
            thick = list(shape)
            thick[axis] = max(2, round(shape[axis] / factor))
            image = F.interpolate(F.interpolate(image[None], size=thick, mode="area"), size=shape, mode="trilinear")[0]
        gamma = float(torch.exp(torch.tensor(self.R.normal(0, self.gamma_std))))
        return image.clamp(0, 1) ** gamma

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        shared = (
            self._contrast() if self.same_contrast_prob > 0 and self.R.uniform() < self.same_contrast_prob else None
        )
        for key, image_key in self.key_iterator(d, self.image_keys):
            labels = convert_to_tensor(d[key], track_meta=False)
            if labels.ndim != 4 or labels.shape[0] != 1:
                raise ValueError(f"{key} must be a label map [1, X, Y, Z], got shape {tuple(labels.shape)}.")
            d[image_key] = self._render(labels, shared or self._contrast())
        return d


class LabelToContrastd(MapTransform, Transform):
    """Render each label map in ``keys`` in one named contrast (:func:`common.synthesis.render_contrast`), the same
    image every time: the deterministic pairs of validation sets and benchmarks.

    Args:
        keys: label maps ``[1, X, Y, Z]`` (FreeSurfer values).
        image_keys: where to write each key's image ``[1, X, Y, Z]`` (float32 in ``[0, 1]``).
        contrasts: the contrast of each key (``"t1"``, ``"t2"``, ``"flair"`` or ``"pd"``).
        seed: seed of the first key's rendering; the next keys use ``seed + 1``, ``seed + 2``...
        contrast_key: where each item names the contrast of all its keys instead (a validation list that mixes
            contrasts); ``contrasts`` is then left out.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_keys: KeysCollection,
        contrasts: Sequence[str] = (),
        seed: int = 0,
        contrast_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.image_keys, self.contrasts, self.contrast_key = ensure_tuple(image_keys), tuple(contrasts), contrast_key
        if (contrast_key is None) != bool(self.contrasts):
            raise ValueError("give either contrasts (one per label key) or contrast_key, not both.")
        if len(self.image_keys) != len(self.keys) or (self.contrasts and len(self.contrasts) != len(self.keys)):
            raise ValueError(f"one image key and one contrast per label key ({len(self.keys)}).")
        self.seed = seed

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for i, key in enumerate(self.keys):
            if key not in d:
                continue
            labels = convert_to_tensor(d[key], track_meta=False)
            contrast = self.contrasts[i] if self.contrasts else d[self.contrast_key]
            image = render_contrast(labels[0].round().long(), contrast, seed=self.seed + i)
            d[self.image_keys[i]] = image[None]
        return d
