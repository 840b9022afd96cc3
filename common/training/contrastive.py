"""Contrastive training of a dense descriptor: two views of one anatomy, InfoNCE steps, retrieval validation.

The pieces plug into MONAI's engines: :class:`RandContrastViewsd` is a dictionary transform for the data pipeline,
:class:`ContrastiveIteration` is the ``iteration_update`` of a ``monai.engines.SupervisedTrainer`` and
:class:`RetrievalIteration` that of a ``monai.engines.Evaluator``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from ignite.engine import Engine
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor

from common.losses.contrastive import sample_voxels, voxel_similarities
from common.synthesis import CONTRASTS, render_contrast

__all__ = [
    "ContrastiveIteration",
    "RandContrastViewsd",
    "RandShiftedViewsd",
    "RetrievalIteration",
    "corresponding_parts",
    "retrieval_accuracy",
]


class RandContrastViewsd(RandomizableTransform, MapTransform):
    """Two co-registered views of one anatomy and its foreground, for voxel-level contrastive learning.

    From a label map under ``label_key``: two renderings (:func:`common.synthesis.render_contrast`) in two different
    contrasts drawn from ``contrasts``, with random seeds, so the views differ as T1w and T2w scans of one head do.
    From an image under ``image_key`` (already scaled to ``[0, 1]``): the image twice; a later intensity
    augmentation (e.g. :class:`common.transforms.RandMonotoneBezierd`) makes them differ.

    Writes ``view_a``, ``view_b`` (``[1, X, Y, Z]`` float32 in ``[0, 1]``) and ``mask`` (``[1, X, Y, Z]``, 1 inside the
    head) and drops the source key. With ``fixed_contrasts`` the two contrasts are always those (for validation).
    """

    def __init__(
        self,
        label_key: str = "label",
        image_key: str = "image",
        contrasts: Sequence[str] = CONTRASTS,
        fixed_contrasts: Sequence[str] | None = None,
        seed_offset: int = 0,
    ) -> None:
        MapTransform.__init__(self, [label_key, image_key], allow_missing_keys=True)
        RandomizableTransform.__init__(self, prob=1.0)
        self.label_key, self.image_key = label_key, image_key
        self.contrasts, self.fixed_contrasts, self.seed_offset = tuple(contrasts), fixed_contrasts, seed_offset

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.label_key in d:
            labels = convert_to_tensor(d.pop(self.label_key), track_meta=False)[0]
            if self.fixed_contrasts is None:
                pair = self.R.choice(len(self.contrasts), size=2, replace=False)
                names = [self.contrasts[i] for i in pair]
                seeds = [int(s) for s in self.R.randint(0, 2**31 - 1, size=2)]
            else:
                names, seeds = list(self.fixed_contrasts), [self.seed_offset, self.seed_offset + 1]
            views = [render_contrast(labels, c, seed=s) for c, s in zip(names, seeds)]
            mask = (labels > 0).float()
        elif self.image_key in d:
            image = convert_to_tensor(d.pop(self.image_key), track_meta=False)[0].float()
            views, mask = [image, image.clone()], (image > 0).float()
        else:
            raise KeyError(
                f"each item needs a {self.label_key!r} or an {self.image_key!r} entry, got {sorted(map(str, d))}."
            )
        d["view_a"], d["view_b"], d["mask"] = views[0][None], views[1][None], mask[None]
        return d


class RandShiftedViewsd(RandomizableTransform, MapTransform):
    """Cuts the two views from different places of one larger crop, so that a voxel's place in its view says nothing
    about which voxel of the other view shows the same anatomy.

    Co-located views let a network match voxels by position alone (zero padding tells convolutions where they are):
    InfoNCE rewards that, registration cannot use it. ``view_a_keys`` are cut at a random corner ``o_a`` and
    ``view_b_keys`` at ``o_b``, each in ``[0, max_shift]`` per axis, to the input shape minus ``max_shift``; ``offset``
    (int64 ``[3]``) is ``o_a - o_b``: voxel ``x`` of view a shows the anatomy of voxel ``x + offset`` of view b.
    Spatial augmentations shared by the views must come before this transform. With ``fixed``, ``o_a = 0`` and
    ``o_b = max_shift`` on every axis (for validation).
    """

    def __init__(
        self,
        max_shift: int,
        view_a_keys: Sequence[str] = ("view_a", "mask"),
        view_b_keys: Sequence[str] = ("view_b",),
        fixed: bool = False,
    ) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}.")
        MapTransform.__init__(self, [*view_a_keys, *view_b_keys])
        RandomizableTransform.__init__(self, prob=1.0)
        self.max_shift, self.view_a_keys, self.view_b_keys, self.fixed = max_shift, view_a_keys, view_b_keys, fixed

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        s = self.max_shift
        if self.fixed:
            corners = [0] * 3, [s] * 3
        else:
            corners = tuple([int(c) for c in self.R.randint(0, s + 1, size=3)] for _ in range(2))
        for keys, corner in zip((self.view_a_keys, self.view_b_keys), corners):
            for key in keys:
                size = d[key].shape[-3:]
                if min(size) <= s:
                    raise ValueError(f"{key!r} of shape {tuple(size)} is too small for max_shift {s}.")
                d[key] = d[key][(..., *(slice(c, c + n - s) for c, n in zip(corner, size)))]
        d["offset"] = torch.tensor(corners[0]) - torch.tensor(corners[1])
        return d


def corresponding_parts(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, offset: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per batch item, the parts of ``a`` and ``b`` ``[B, C, *S]`` (and of ``a``'s ``mask``) that show one anatomy.

    ``offset`` ``[B, 3]`` (from :class:`RandShiftedViewsd`): voxel ``x`` of ``a[i]`` is voxel ``x + offset[i]`` of
    ``b[i]``. Returns ``(a_i, b_i, mask_i)`` of shapes ``[1, C, *S_i]``; without ``offset``, the whole batch at once.
    """
    if offset is None:
        return [(a, b, mask)]
    parts = []
    for i, shift in enumerate(offset.tolist()):
        in_a = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(shift, a.shape[2:]))
        in_b = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(shift, b.shape[2:]))
        part_mask = None if mask is None else mask[i : i + 1][(..., *in_a)]
        parts.append((a[i : i + 1][(..., *in_a)], b[i : i + 1][(..., *in_b)], part_mask))
    return parts


def retrieval_accuracy(
    a: torch.Tensor, b: torch.Tensor, num_samples: int = 1024, mask: torch.Tensor | None = None
) -> float:
    """Top-1 voxel retrieval between two descriptor maps ``[B, C, *S]`` of one anatomy.

    ``num_samples`` voxels are drawn (inside ``mask``); a voxel of ``a`` counts as retrieved when its most similar
    descriptor among the drawn voxels of ``b`` (cosine) is its own. Chance level is ``1 / num_samples``.
    """
    index = sample_voxels(a.shape, num_samples, mask, device=a.device)
    sims = voxel_similarities(a, b, index)
    target = torch.arange(sims.shape[1], device=a.device)
    return float((sims.argmax(dim=2) == target).float().mean())


class ContrastiveIteration:
    """One training step: both views through ``engine.network``, ``engine.loss_function(desc_a, desc_b, mask)``.

    The views ``view_a``, ``view_b`` ``[B, 1, *S]`` go through the network as one batch of ``2B``; with an ``offset``
    in the batch, the loss is the mean over items of the loss on their :func:`corresponding_parts`.
    """

    def __call__(self, engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        device = engine.state.device
        a, b, mask = (batch[k].to(device, non_blocking=engine.non_blocking) for k in ("view_a", "view_b", "mask"))
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        desc_a, desc_b = engine.network(torch.cat([a, b])).chunk(2)
        parts = corresponding_parts(desc_a, desc_b, mask, batch.get("offset"))
        loss = torch.stack([engine.loss_function(*part) for part in parts]).mean()
        loss.backward()
        engine.optimizer.step()
        return {"loss": loss.item()}


class RetrievalIteration:
    """One validation step: :func:`retrieval_accuracy` of the two views' descriptors (mean over the batch's
    :func:`corresponding_parts`), under ``torch.no_grad``."""

    def __init__(self, num_samples: int = 1024, seed: int = 0) -> None:
        self.num_samples, self.seed = num_samples, seed

    def __call__(self, engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        device = engine.state.device
        a, b, mask = (batch[k].to(device) for k in ("view_a", "view_b", "mask"))
        engine.network.eval()
        # the same voxels at every validation, so that the curve shows the network, not the draw
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed + engine.state.iteration)
            desc_a, desc_b = engine.network(torch.cat([a, b])).chunk(2)
            parts = corresponding_parts(desc_a, desc_b, mask, batch.get("offset"))
            return {"retrieval": sum(retrieval_accuracy(*p[:2], self.num_samples, p[2]) for p in parts) / len(parts)}
