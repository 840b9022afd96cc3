"""Per-label overlap and surface-distance metrics between two label maps on one grid."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.utils import convert_to_tensor

__all__ = ["dice_per_label", "hd95_per_label", "mean_dict"]


def _as_label_volume(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Return a plain integer tensor [X, Y, Z] from [X, Y, Z] or [1, X, Y, Z] input (float labels are rounded)."""
    t = convert_to_tensor(x, track_meta=False)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"{name} must have shape [X, Y, Z] or [1, X, Y, Z], got {tuple(t.shape)}.")
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.round().long() if t.is_floating_point() else t


def _labels_and_volumes(
    pred: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, labels: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    p, r = _as_label_volume(pred, "pred"), _as_label_volume(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {tuple(p.shape)} and {tuple(r.shape)}.")
    dtype = torch.promote_types(p.dtype, r.dtype)
    p, r = p.to(dtype), r.to(dtype)
    if labels is None:
        common = set(torch.unique(p).tolist()) & set(torch.unique(r).tolist())
        labels = sorted(int(v) for v in common if v != 0)
    return p, r, [int(v) for v in labels]


def _label_boxes(p: torch.Tensor, r: torch.Tensor, labels: Sequence[int]) -> list[tuple[slice, ...] | None]:
    """Bounding box of ``(p == label) | (r == label)`` for every label; None where the label is in neither map.

    One histogram of (slice index, label) per axis gives all boxes in a few passes over the volume, so the per-label
    work below only touches each label's own box.
    """
    if not labels:
        return []
    lut = torch.tensor(sorted(set(labels)), dtype=p.dtype, device=p.device)
    row = {int(v): i for i, v in enumerate(lut)}
    both = torch.stack([p, r])
    ids = torch.searchsorted(lut, both).clamp_(max=len(lut) - 1)
    ids[lut[ids] != both] = len(lut)  # voxels of unrequested labels go to an extra bin
    n_bins = len(lut) + 1
    extents = []
    for axis in range(3):
        size = both.shape[axis + 1]
        coord = torch.arange(size, device=p.device).view([1] + [size if a == axis else 1 for a in range(3)])
        hist = torch.bincount((coord * n_bins + ids).flatten(), minlength=size * n_bins).view(size, n_bins)
        extents.append(hist[:, :-1].T > 0)  # [n_labels, size]: the label occurs in this slice
    boxes: list[tuple[slice, ...] | None] = []
    for label in labels:
        box = []
        for present in extents:
            hit = torch.nonzero(present[row[label]]).flatten()
            box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.numel() else None)
        boxes.append(None if box[0] is None else tuple(box))
    return boxes


def _masks(p: torch.Tensor, r: torch.Tensor, label: int, box: tuple[slice, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary masks of ``label`` inside ``box`` as [1, 1, x, y, z] (the batch/channel layout of monai.metrics)."""
    return (p[box] == label)[None, None], (r[box] == label)[None, None]


def _per_label(
    pred: torch.Tensor | np.ndarray,
    ref: torch.Tensor | np.ndarray,
    labels: Sequence[int] | None,
    metric: Callable[[torch.Tensor, torch.Tensor], float],
) -> dict[int, float]:
    """``metric`` of the two masks of each label, cropped to their joint bounding box; NaN for a label in neither."""
    p, r, labels = _labels_and_volumes(pred, ref, labels)
    return {
        label: math.nan if box is None else metric(*_masks(p, r, label, box))
        for label, box in zip(labels, _label_boxes(p, r, labels))
    }


def dice_per_label(
    pred: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, labels: Sequence[int] | None = None
) -> dict[int, float]:
    """Dice coefficient of each label, computed with ``monai.metrics.compute_dice``.

    Args:
        pred: integer label map [X, Y, Z] (or [1, X, Y, Z]).
        ref: integer label map on the same grid.
        labels: labels to score; default: every non-zero label present in both maps.

    Returns:
        ``{label: dice}``; a label present in only one map scores 0, a label absent from both is NaN.
    """
    return _per_label(
        pred, ref, labels, lambda mp, mr: float(compute_dice(mp, mr, include_background=True, ignore_empty=False))
    )


def hd95_per_label(
    pred: torch.Tensor | np.ndarray,
    ref: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    labels: Sequence[int] | None = None,
) -> dict[int, float]:
    """Symmetric 95th-percentile Hausdorff distance of each label in mm (``monai.metrics.compute_hausdorff_distance``).

    Args:
        pred: integer label map [X, Y, Z] (or [1, X, Y, Z]).
        ref: integer label map on the same grid.
        spacing: voxel size along the three array axes, mm.
        labels: labels to score; default: every non-zero label present in both maps.

    Returns:
        ``{label: hd95_mm}``; NaN for a label missing from either map, where the distance is undefined.
    """
    mm = [float(s) for s in spacing]

    def hd95(mp: torch.Tensor, mr: torch.Tensor) -> float:
        if not mp.any() or not mr.any():
            return math.nan
        return float(compute_hausdorff_distance(mp, mr, include_background=True, percentile=95, spacing=mm))

    return _per_label(pred, ref, labels, hd95)


def mean_dict(scores: Mapping[int, float]) -> float:
    """Mean of the finite values of a per-label score dict; NaN when there are none."""
    values = [v for v in scores.values() if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan
