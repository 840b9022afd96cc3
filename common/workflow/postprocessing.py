"""Postprocessing of a registered pair: dictionary transforms on the evaluator's per-pair output.

The output holds ``fixed`` ``[1, X, Y, Z]`` and ``moving`` ``[1, U, V, W]`` (each on its own grid, on the
registration device), their 4x4 RAS affines ``fixed_affine`` and ``moving_affine`` (float64), ``ddf``
``[1, 3, X, Y, Z]`` (pull-back displacement in fixed-grid voxels), ``spacing`` (fixed voxel size, mm) and, when
given, ``fixed_label``/``moving_label`` (int, on their image's grid) and ``fixed_landmarks``/``moving_landmarks``
(``[N, 3]`` RAS mm). ``fixed_to_moving`` (4x4 float64, RAS mm), when present, is the affine pre-alignment: a fixed
point ``x`` maps to ``T(x + ddf(x))`` in the moving image's world (ANTs' order: the field, then the affine).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep

from common.io import resample_to_grid
from common.metrics import (
    dice_per_label,
    foreground,
    hd95_per_label,
    mean_dict,
    ndv_percent,
    nonpositive_jacobian_percent,
    normalized_mutual_information,
    percentiles,
    tre,
)
from common.spatial import identity_grid, jacobian_determinant

__all__ = ["InverseOnMovingGridd", "JacobianDeterminantd", "PlausibilityReportd", "RegistrationMetricsd", "WarpMovingd"]


class WarpMovingd(MapTransform):
    """Resample moving-grid images onto the fixed grid through ``ddf``, once, as ITK's ``WarpImageFilter`` does.

    Args:
        keys: moving-grid entries to warp (missing ones are skipped).
        output_keys: where each warped ``[1, X, Y, Z]`` goes.
        mode: ``"bilinear"`` or ``"nearest"``, one or one per key.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving", "moving_label"),
        output_keys: KeysCollection = ("warped", "warped_label"),
        mode: Sequence[str] | str = ("bilinear", "nearest"),
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys))
        self.mode = ensure_tuple_rep(mode, len(self.keys))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shape = d["fixed"].shape[1:]
        for key, out, mode in self.key_iterator(d, self.output_keys, self.mode):
            with torch.no_grad():
                d[out] = resample_to_grid(d[key], d["moving_affine"], sampling_affine(d), shape, d["ddf"][0], mode)
        return d


def sampling_affine(data: Mapping[Hashable, Any]) -> torch.Tensor:
    """The fixed grid's voxel-to-world map into the moving image's world: ``T A_fixed`` (``A_fixed`` without an
    affine stage)."""
    if "fixed_to_moving" not in data:
        return data["fixed_affine"]
    return data["fixed_to_moving"].to(data["fixed_affine"]) @ data["fixed_affine"]


class InverseOnMovingGridd(MapTransform):
    """The inverse displacement, given on the fixed grid in its voxels (``inverse_ddf``: ``y -> y + w(y)`` undoes the
    deformable part), as one field on the moving image's own grid in its voxels, ``[1, 3, U, V, W]``, the affine
    pre-alignment's inverse folded in: moving voxel ``m`` (world ``A_m m``) goes to fixed voxel
    ``x = A_f^-1 T^-1 A_m m`` and on to ``x + w(x)``, so that ``m`` plus the field is where the fixed image's content at
    that place comes from (ITK's convention for warping the fixed image, or fixed-space labels, onto the moving grid).
    Without an affine stage (``T`` the identity) this is ``(A_m^-1 A_f)[:3, :3] w(A_f^-1 A_m m)``; where ``x`` falls
    outside the fixed grid, ``w`` is zero."""

    def __init__(self, keys: KeysCollection = "inverse_ddf", output_key: str = "inverse_ddf_moving") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            a_fixed, a_moving, shape = d["fixed_affine"], d["moving_affine"], d["moving"].shape[1:]
            with torch.no_grad():
                if "fixed_to_moving" not in d:
                    on_moving = resample_to_grid(d[key][0], a_fixed, a_moving, shape)
                    linear = (torch.linalg.inv(a_moving) @ a_fixed)[:3, :3].to(on_moving)
                    d[self.output_key] = torch.einsum("ij,j...->i...", linear, on_moving)[None]
                    continue
                back = torch.linalg.inv(d["fixed_to_moving"].to(a_fixed)) @ a_moving  # moving voxel -> fixed world
                on_moving = resample_to_grid(d[key][0], a_fixed, back, shape).to(torch.float64)
                index = identity_grid(shape, device=on_moving.device, dtype=torch.float64).reshape(3, -1)
                affine_part = ((back - a_moving) @ F.pad(index, (0, 0, 0, 1), value=1.0))[:3]  # mm
                world = affine_part + a_fixed[:3, :3].to(on_moving) @ on_moving.reshape(3, -1)
                voxels = torch.linalg.inv(a_moving[:3, :3]).to(world) @ world
                d[self.output_key] = voxels.reshape(1, 3, *shape).to(d[key].dtype)
        return d


class JacobianDeterminantd(MapTransform):
    """The determinant of the Jacobian of ``x -> x + ddf(x)``, ``[X, Y, Z]``, stored under ``output_key``."""

    def __init__(self, keys: KeysCollection = "ddf", output_key: str = "jacobian") -> None:
        super().__init__(keys)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            with torch.no_grad():
                d[self.output_key] = jacobian_determinant(d[key])[0, 0]
        return d


def _overlap(pred: torch.Tensor, ref: torch.Tensor, spacing: Sequence[float]) -> tuple[dict, dict]:
    dice = dice_per_label(pred, ref)
    hd95 = hd95_per_label(pred, ref, spacing, labels=list(dice))
    return {"mean": mean_dict(dice), "per_label": dice}, {"mean": mean_dict(hd95), "per_label": hd95}


class RegistrationMetricsd(MapTransform):
    """The contract's measures of one pair under ``metrics``: folding of ``jacobian``; Dice and HD95 (mm) of the
    label maps before (moving labels resampled onto the fixed grid without the field) and after registration
    (``warped_label``); target registration error (mm) of the landmarks before and after.

    ``metrics`` gets ``nonpositive_jacobian_percent``, ``ndv_percent``, ``jacobian_min`` and, when the inputs are
    there, ``dice`` and ``hd95_mm`` (``{"before"|"after": {"mean", "per_label"}}``) and ``tre_mm``
    (``{"before"|"after": {"mean", "per_point"}}``).
    """

    def __init__(self, keys: KeysCollection = "metrics") -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        det, ddf = d["jacobian"], d["ddf"][0]
        metrics: dict[str, Any] = {
            "nonpositive_jacobian_percent": nonpositive_jacobian_percent(det),
            "ndv_percent": ndv_percent(ddf),
            "jacobian_min": float(det.min()),
        }
        if "warped_label" in d and "fixed_label" in d:
            fixed_label = d["fixed_label"][0].cpu()
            shape = fixed_label.shape
            before = resample_to_grid(d["moving_label"], d["moving_affine"], d["fixed_affine"], shape, mode="nearest")
            scores = {
                "before": _overlap(before[0].cpu(), fixed_label, d["spacing"]),
                "after": _overlap(d["warped_label"][0].cpu(), fixed_label, d["spacing"]),
            }
            metrics["dice"] = {k: v[0] for k, v in scores.items()}
            metrics["hd95_mm"] = {k: v[1] for k, v in scores.items()}
        if "fixed_landmarks" in d:
            fixed_pts, moving_pts, affine = d["fixed_landmarks"], d["moving_landmarks"], d["fixed_affine"]
            errors = {
                "before": tre(fixed_pts, moving_pts, torch.zeros_like(ddf), affine),
                "after": tre(fixed_pts, moving_pts, ddf, affine, d.get("fixed_to_moving")),
            }
            metrics["tre_mm"] = {k: {"mean": float(v.mean()), "per_point": v.tolist()} for k, v in errors.items()}
        for key in self.keys:
            d[key] = {**d.get(key, {}), **metrics}
        return d


class PlausibilityReportd(MapTransform):
    """Whether a result looks plausible, from what every run has (no labels needed), under ``metrics["plausibility"]``:
    the percentiles (1, 5, 50, 95, 99) of the Jacobian determinant and of the displacement (mm) inside the fixed
    image's foreground (the fixed mask when given, else voxels above ``foreground`` of its 99th percentile), the NMI
    between the fixed image and the moving one before the deformable stage (``moving_on_fixed``) and after
    (``warped``), and ``warnings``: the similarity fell, local volume changes beyond ``max_volume_change`` (either
    way) at the 1st or 99th percentile, or a displacement of more than ``max_shift_mm`` at the 99th percentile for an
    NMI gain under ``min_gain``.

    Args:
        foreground: fraction of the fixed image's 99th percentile above which a voxel is foreground.
        max_volume_change: the det J ratio (and its inverse) beyond which local volume change is flagged.
        max_shift_mm: the 99th-percentile displacement flagged when the similarity barely rose.
        min_gain: the NMI gain below which a large displacement is unexplained.
    """

    def __init__(
        self,
        keys: KeysCollection = "metrics",
        foreground: float = 0.1,
        max_volume_change: float = 4.0,
        max_shift_mm: float = 10.0,
        min_gain: float = 0.005,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if not 0 <= foreground < 1 or max_volume_change <= 1 or max_shift_mm <= 0:
            raise ValueError("need 0 <= foreground < 1, max_volume_change > 1 and max_shift_mm > 0.")
        self.foreground, self.max_volume_change = foreground, max_volume_change
        self.max_shift_mm, self.min_gain = max_shift_mm, min_gain

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        with torch.no_grad():
            fixed = d["fixed"][0].float()
            inside = d["fixed_mask"][0] > 0 if "fixed_mask" in d else foreground(fixed, self.foreground)
            spacing = torch.as_tensor(d["spacing"], dtype=torch.float32, device=fixed.device).view(3, 1, 1, 1)
            shift = (d["ddf"][0].float() * spacing).norm(dim=0)[inside]
            det = d["jacobian"].float()[inside]
            det_p, shift_p = (percentiles(x, [1.0, 5.0, 50.0, 95.0, 99.0], max_values=500_000) for x in (det, shift))
            nmi = {
                when: normalized_mutual_information(fixed, d[key][0], mask=inside)
                for when, key in (("before", "moving_on_fixed"), ("after", "warped"))
            }
        warnings = []
        gain = nmi["after"] - nmi["before"]
        if gain < -self.min_gain:
            warnings.append(f"the similarity fell (NMI {nmi['before']:.3f} -> {nmi['after']:.3f})")
        if det_p[0] < 1 / self.max_volume_change or det_p[-1] > self.max_volume_change:
            warnings.append(
                f"local volume changes beyond {self.max_volume_change:g}x (det J 1-99 %: {det_p[0]:.2f}-{det_p[-1]:.2f})"
            )
        if shift_p[-1] > self.max_shift_mm and gain < self.min_gain:
            warnings.append(f"large displacements ({shift_p[-1]:.1f} mm at the 99th percentile) for no similarity gain")
        names = ("p1", "p5", "p50", "p95", "p99")
        report = {
            "region": "fixed mask"
            if "fixed_mask" in d
            else f"fixed image above {self.foreground:g} of its 99th percentile",
            "jacobian_percentiles": dict(zip(names, det_p.tolist())),
            "displacement_mm_percentiles": dict(zip(names, shift_p.tolist())),
            "nmi": nmi,
            "warnings": warnings,
        }
        for key in self.keys:
            d[key] = {**d.get(key, {}), "plausibility": report}
        return d
